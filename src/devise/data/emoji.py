"""The built-in emoji benchmark: about 850 object classes drawn in six styles, built once into the data home.

Sources (all from package registries, see docs/offline-assets): npm emoji-datasource-google and
emoji-datasource-twitter (64 px PNGs + emoji.json with categories), fluentui-emoji (Fluent flat SVGs),
@lobehub/fluent-emoji-3d (Fluent 3D webp), openmoji (SVGs), and Debian's fonts-noto-color-emoji
(glyphs rendered with Pillow). Never Apple or Facebook artwork: not licensed for this.

Classes: object emoji only (categories Animals & Nature, Food & Drink, Travel & Places, Objects,
Activities); emoji-datasource lists skin-tone variants inside their base emoji and puts people, gender
variants, flags, keycaps and symbols in other categories, so none of those enter. A class is the CLDR
English name (from the PyPI `emoji` package: ":water_buffalo:" -> "water buffalo"). A class is KEPT
ONLY IF AT LEAST 4 OF THE 6 STYLES DRAW IT (MIN_STYLES), so every class can lose one style to a test set
and still train on three.

Layout under data_home()/"emoji": images/<style>/<codepoint>.png (224x224 RGB on white, the emoji's
longer side filling 85% of the frame), classes.json (codepoint, name, category, subcategory, wnid,
match, styles per class) and manifest.json (package versions and sizes, counts, build time).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from devise.assets import data_home
from devise.data.datasets import (ARTIFACT, FOOD, NATURAL_OBJECT, ORGANISM, ImageDataset, match_class_name, register_dataset,
                             wordnet_lookup)
from devise.errors import DeviseError
from devise.storage import check_files, file_entries
from devise.labels.wordnet import load_wordnet

NAME = "emoji"  # the dataset's registered name (load_dataset("emoji"), `devise train emoji`)
STYLES = ("google", "twitter", "fluent_flat", "fluent_3d", "openmoji", "noto")
NPM_PACKAGES = {
    "emoji-datasource-google": "16.0.0",
    "emoji-datasource-twitter": "16.0.0",
    "fluentui-emoji": "1.3.0",
    "@lobehub/fluent-emoji-3d": "1.1.0",
    "openmoji": "17.0.0",
}
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_SIZE = 109  # the one bitmap size NotoColorEmoji (CBDT) holds
OBJECT_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Objects", "Activities")
MIN_STYLES = 4
IMAGE_SIZE = 224
FILL = 0.85
SVG_RENDER_SIZE = 512
FORMAT_VERSION = 1
# Fluent flat files are named by an older CLDR name for a few emoji.
FLUENT_FLAT_ALIASES = {"stuffed flatbread": "flatbread"}


def emoji_dir() -> Path:
    """Where the built benchmark lives: data_home()/emoji."""
    return data_home() / NAME


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT_VERSION else None


def built_problem() -> str | None:
    """None when a complete benchmark of the current format is in the data home, else what is wrong: not
    built, or classes.json missing or not the one its manifest lists (size, SHA-256; builds before the
    manifest listed it are not checked)."""
    folder = emoji_dir()
    manifest = _read_manifest(folder)
    if manifest is None:
        return "not built"
    if not (folder / "classes.json").is_file():
        return f"{folder / 'classes.json'}: missing"
    try:
        check_files(folder, manifest.get("files", {}), "manifest.json")
    except DeviseError as exc:
        return str(exc)
    return None


def is_built() -> bool:
    """True when a complete benchmark of the current format is in the data home."""
    return built_problem() is None


# ------------------------------------------------------------------ sources

def install_npm_packages() -> Path:
    """npm install the artwork packages into data_home()/npm (skipped when the right versions are there)."""
    prefix = data_home() / "npm"
    modules = prefix / "node_modules"

    def installed(name: str) -> str | None:
        try:
            return json.loads((modules / name / "package.json").read_text()).get("version")
        except (OSError, ValueError):
            return None

    missing = [f"{n}@{v}" for n, v in NPM_PACKAGES.items() if installed(n) != v]
    if missing:
        if shutil.which("npm") is None:
            raise DeviseError("npm not found: run 'apt-get install npm' (needed once to fetch the emoji artwork)")
        print(f"devise: npm install {' '.join(missing)} (about 400 MB, once)", flush=True)
        prefix.mkdir(parents=True, exist_ok=True)
        cmd = ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DeviseError(f"npm install of the emoji artwork failed ({last}): check access to the npm registry")
    return modules


def _cldr_name(char: str) -> str | None:
    import emoji as emoji_names
    info = emoji_names.EMOJI_DATA.get(char)
    if info is None:
        return None
    return info["en"].strip(":").replace("_", " ").replace("’", "'")


def _char(unified: str) -> str:
    return "".join(chr(int(part, 16)) for part in unified.split("-"))


def object_emoji(modules: Path) -> list[dict]:
    """The object emoji of emoji-datasource (one entry per base emoji, no skin tones), with CLDR names."""
    entries = json.loads((modules / "emoji-datasource-google" / "emoji.json").read_text())
    found = []
    for e in sorted(entries, key=lambda e: e["sort_order"]):
        if e["category"] not in OBJECT_CATEGORIES:
            continue
        char = _char(e["unified"])
        name = _cldr_name(char)
        if name is None:
            continue
        found.append({"codepoint": e["unified"].lower(), "non_qualified": (e.get("non_qualified") or "").lower(),
                      "char": char, "name": name, "category": e["category"], "subcategory": e["subcategory"],
                      "image": e["image"], "has_google": e.get("has_img_google", False),
                      "has_twitter": e.get("has_img_twitter", False)})
    return found


def _slug(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower().replace("'", "")).strip("-")


def source_files(entry: dict, modules: Path) -> dict[str, Path | str]:
    """{style: source file (or the character, for noto)} for the styles whose package has this emoji."""
    found: dict[str, Path | str] = {}
    for style, flag in (("google", "has_google"), ("twitter", "has_twitter")):
        path = modules / f"emoji-datasource-{style}" / "img" / style / "64" / entry["image"]
        if entry[flag] and path.is_file():
            found[style] = path
    slug = _slug(FLUENT_FLAT_ALIASES.get(entry["name"], entry["name"]))
    for candidate in (f"{slug}.svg", f"{slug}-default.svg"):
        path = modules / "fluentui-emoji" / "icons" / "flat" / candidate
        if path.is_file():
            found["fluent_flat"] = path
            break
    codes = [c for c in (entry["codepoint"], entry["non_qualified"]) if c]
    for code in codes:
        path = modules / "@lobehub" / "fluent-emoji-3d" / "assets" / f"{code}.webp"
        if path.is_file():
            found["fluent_3d"] = path
            break
    for code in codes:
        path = modules / "openmoji" / "color" / "svg" / f"{code.upper()}.svg"
        if path.is_file():
            found["openmoji"] = path
            break
    if NOTO_FONT.is_file():
        found["noto"] = entry["char"]
    return found


# ------------------------------------------------------------------ rendering

_FONT = None


def _noto_font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.truetype(str(NOTO_FONT), NOTO_SIZE)
    return _FONT


def _render_noto(char: str) -> Image.Image | None:
    """The Noto glyph as RGBA, or None when the font lacks it (nothing drawn, or a ZWJ sequence falling
    apart into several glyphs)."""
    font = _noto_font()
    canvas = Image.new("RGBA", (NOTO_SIZE * 4, NOTO_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((NOTO_SIZE // 2, NOTO_SIZE // 4), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None or box[2] - box[0] > 1.4 * NOTO_SIZE * 1.25:
        return None
    return canvas


def _open_source(style: str, source: Path | str) -> Image.Image | None:
    if style == "noto":
        return _render_noto(source)
    if Path(source).suffix == ".svg":
        import resvg_py
        png = resvg_py.svg_to_bytes(svg_path=str(source), width=SVG_RENDER_SIZE, height=SVG_RENDER_SIZE,
                                    skip_system_fonts=True)
        return Image.open(io.BytesIO(bytes(png))).convert("RGBA")
    with Image.open(source) as image:
        return image.convert("RGBA")


def frame_on_white(image: Image.Image, size: int = IMAGE_SIZE, fill: float = FILL) -> Image.Image | None:
    """Crop an RGBA drawing to its visible pixels, scale its longer side to `fill` of the frame, centre it
    on white: (size, size) RGB. None when nothing is visible."""
    alpha = image.getchannel("A")
    box = alpha.point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        return None
    image = image.crop(box)
    scale = fill * size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new, Image.LANCZOS)
    out = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    out.alpha_composite(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return out.convert("RGB")


def _render_entry(job: tuple[dict, dict, str]) -> tuple[str, list[str], list[str]]:
    """Render one emoji in every style it has into out/images/<style>/<codepoint>.png.

    Returns (codepoint, styles written, problems)."""
    entry, sources, out = job
    written, problems = [], []
    for style, source in sources.items():
        try:
            image = _open_source(style, source)
            framed = frame_on_white(image) if image is not None else None
        except (OSError, ValueError) as exc:
            problems.append(f"{style}/{entry['codepoint']}: {exc}")
            continue
        if framed is None:
            continue
        framed.save(Path(out) / "images" / style / f"{entry['codepoint']}.png", optimize=False)
        written.append(style)
    return entry["codepoint"], written, problems


# ------------------------------------------------------------------ build

def _wordnet_preference(category: str, subcategory: str) -> tuple[str, ...]:
    """Which WordNet senses an emoji of this category shows: animals/plants, food, or artifacts."""
    if category == "Animals & Nature":
        return (ORGANISM, NATURAL_OBJECT)
    if category == "Food & Drink":
        return (ARTIFACT,) if subcategory == "dishware" else FOOD
    if subcategory in ("place-geographic", "sky & weather"):
        return ()
    return (ARTIFACT,)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@contextmanager
def _build_lock():
    """One builder at a time per data home (setup and a test run may race)."""
    with open(data_home() / ".emoji.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_emoji_benchmark(force: bool = False, workers: int | None = None) -> Path:
    """Build the benchmark into data_home()/emoji once; later calls return at once (force=True rebuilds).

    Built in a temporary folder and renamed into place, so an interrupted build leaves nothing half-made.
    """
    target = emoji_dir()
    if is_built() and not force:
        return target
    with _build_lock():
        problem = built_problem()
        if problem is None and not force:
            return target
        if problem != "not built" and not force:
            warnings.warn(f"emoji benchmark damaged ({problem}): building it again", stacklevel=2)
        return _build(target, workers)


def _build(target: Path, workers: int | None) -> Path:
    from tqdm import tqdm

    start = time.time()
    modules = install_npm_packages()
    if not NOTO_FONT.is_file():
        raise DeviseError(f"{NOTO_FONT} missing: run 'apt-get install fonts-noto-color-emoji'")
    entries = object_emoji(modules)
    tmp = Path(tempfile.mkdtemp(prefix=".emoji-build-", dir=data_home()))
    try:
        for style in STYLES:
            (tmp / "images" / style).mkdir(parents=True)
        jobs = [(e, {s: src for s, src in source_files(e, modules).items()}, str(tmp)) for e in entries]
        workers = workers or min(4, os.cpu_count() or 1)
        styles_of: dict[str, list[str]] = {}
        problems: list[str] = []
        with ProcessPoolExecutor(workers) as pool:
            for codepoint, written, bad in tqdm(pool.map(_render_entry, jobs, chunksize=8), total=len(jobs),
                                                desc="emoji benchmark", unit="emoji"):
                styles_of[codepoint] = [s for s in STYLES if s in written]
                problems += bad

        wordnet = load_wordnet()
        lookups: dict[tuple, object] = {}
        classes = []
        for e in entries:
            styles = styles_of[e["codepoint"]]
            if len(styles) < MIN_STYLES:
                for style in styles:  # a class we drop leaves no stray images behind
                    (tmp / "images" / style / f"{e['codepoint']}.png").unlink()
                continue
            prefer = _wordnet_preference(e["category"], e["subcategory"])
            if prefer not in lookups:
                lookups[prefer] = wordnet_lookup(prefer, wordnet)
            wnid, how = match_class_name(e["name"], lookups[prefer])
            classes.append({"codepoint": e["codepoint"], "name": e["name"], "category": e["category"],
                            "subcategory": e["subcategory"], "wnid": wnid, "match": how, "styles": styles})
        (tmp / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False))
        manifest = {
            "format": FORMAT_VERSION,
            "packages": {name: {"version": v, "bytes": _folder_bytes(modules / name)} for name, v in NPM_PACKAGES.items()},
            "noto_font": {"path": str(NOTO_FONT), "bytes": NOTO_FONT.stat().st_size},
            "min_styles": MIN_STYLES,
            "classes": len(classes),
            "images": sum(len(c["styles"]) for c in classes),
            "images_per_style": {s: sum(s in c["styles"] for c in classes) for s in STYLES},
            "dropped_classes": len(entries) - len(classes),
            "wordnet_match": dict(Counter(c["match"] for c in classes)),
            "render_problems": problems,
            "build_seconds": round(time.time() - start, 1),
            "files": file_entries(tmp, ["classes.json"]),  # checked by built_problem
        }
        # The manifest is written last: its presence marks a complete build.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = None
        if target.exists():
            old = target.with_name(f".emoji-old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ------------------------------------------------------------------ loading

def load_classes() -> list[dict]:
    """classes.json of the built benchmark (built first if needed)."""
    build_emoji_benchmark()
    return json.loads((emoji_dir() / "classes.json").read_text())


def emoji_manifest() -> dict:
    """manifest.json of the built benchmark (built first if needed)."""
    build_emoji_benchmark()
    return json.loads((emoji_dir() / "manifest.json").read_text())


def load_emoji_dataset() -> ImageDataset:
    """The emoji benchmark as an ImageDataset: images grouped by class, styles per image, wnids per class."""
    classes = load_classes()
    root = emoji_dir()
    paths, labels, styles = [], [], []
    for label, c in enumerate(classes):
        for style in c["styles"]:
            paths.append(str(root / "images" / style / f"{c['codepoint']}.png"))
            labels.append(label)
            styles.append(style)
    return ImageDataset(
        name=NAME, root=str(root), paths=paths, labels=np.asarray(labels, np.int32),
        classes=[c["name"] for c in classes], wnids=[c["wnid"] for c in classes],
        styles=np.asarray(styles), splits=None, match=[c["match"] for c in classes],
    )


def built_location() -> str:
    """The folder of the built benchmark (`devise doctor`); DeviseError saying how to build it if missing."""
    if not is_built():
        raise DeviseError(f"emoji benchmark not built in {emoji_dir()}: run 'devise setup-assets'")
    return str(emoji_dir())


register_dataset(NAME, load_emoji_dataset, prepare=build_emoji_benchmark, holdout_unseen=0.25, check=built_location,
                 description="about 850 object emoji in six drawing styles: the built-in zero-shot benchmark")
