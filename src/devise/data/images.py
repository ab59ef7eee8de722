"""Decoding images into the uint8 arrays every backbone takes, and finding image files in folders.

Decoding: every mode Pillow opens becomes faithful 8-bit RGB, or a DeviseError saying why it cannot:
- EXIF orientation is applied first (phone photos come out upright);
- 16-bit samples (PNG/TIFF "I;16*", and "I", where Pillow's PNG (before 11) and PPM decoders put 16-bit
  data) are scaled by 255/65535; "I" values outside 0..65535 have no known scale and are an error;
- 32-bit float ("F", float TIFF): values within [0, 1] are taken as unit intensities (x255), within
  [0, 255] as 8-bit intensities; anything else (negative, above 255, NaN) is an error, never a stretch;
- 16-bit colour PNGs need nothing: Pillow reads them as RGB/RGBA holding each sample's high byte, which
  is the 8-bit value (65535 -> 255); one with a 16-bit transparent colour key is an error (the key cannot
  be matched on 8-bit samples);
- 1-bit, palette (with its transparency), LA/PA, CMYK (Pillow's plain conversion, no ICC profile),
  YCbCr, LAB and HSV: Pillow's own conversion.

Framing: an opaque image gets the usual ImageNet evaluation policy: short side to size/0.875, centre crop
to size (256 -> 224). An image with transparent pixels (alpha 0: a cut-out, an icon) is cropped to the
box of its visible pixels, composited on white, padded to a white square and resized to size, so a
subject off-centre on a wide canvas is kept whole instead of losing its sides to the centre crop.

Walking: `scan_image_files` is the one place that decides which entries are image files; broken or
looping symbolic links, permission denied, FIFOs, sockets, devices and links to folders are skipped
and listed (`warn_skipped`: one warning), never opened (opening a FIFO blocks forever).
`expand_image_paths` is that walk as predict and index take their arguments (files and folders).
"""
from __future__ import annotations

import errno
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from devise.errors import DeviseError

CROP_FRACTION = 0.875
# Refuse absurd images (decompression bombs) with a clear error instead of Pillow's warning.
MAX_PIXELS = 80_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Names the decode policy above; the image store and feature caches (features.py) are keyed by it, so
# bump it whenever what to_rgb_array returns changes. v2: exact bit depths, alpha-box framing of cut-outs.
POLICY_VERSION = "v2-depth-alphabox-short0.875-bicubic-white"
# Pillow modes holding integer samples wider than 8 bits (read as 16-bit, see above).
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be opened as an image file (None: a regular file we may read).

    Checked before opening: Pillow would block forever on a FIFO and a traceback on a link loop.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "no such file"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    if stat.S_ISFIFO(st.st_mode):
        return "a named pipe (FIFO), not a file"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "a device, not a file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _walk(folder: str, files: list[str], skipped: list[str]) -> None:
    def folder_error(exc: OSError) -> None:
        skipped.append(f"{exc.filename}: folder not readable ({exc.strerror or exc})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=folder_error):
        visible = sorted(d for d in dirnames if not d.startswith("."))
        dirnames[:] = []
        for d in visible:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):  # not followed (a link to a parent loops): say so, the user may expect it
                skipped.append(f"{full}: symbolic link to a folder, not followed")
            else:
                dirnames.append(d)
        for f in sorted(filenames):
            if f.startswith(".") or not is_image_file(f):
                continue
            full = os.path.join(dirpath, f)
            why = unreadable_reason(full)
            if why is None:
                files.append(full)
            else:
                skipped.append(f"{full}: {why}")


def scan_image_files(paths) -> tuple[list[str], list[str]]:
    """Files as given, folders replaced by the image files below them (nested folders included, sorted,
    hidden ones skipped): (files, skipped), skipped being "PATH: why" for every entry that is not a readable
    file. A path that does not exist at all is a DeviseError (a typo, not an entry to skip)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[str] = []
    skipped: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            _walk(p, files, skipped)
        elif not os.path.lexists(p):
            raise DeviseError(f"{p}: no such file or folder")
        elif (why := unreadable_reason(p)) is None:
            files.append(p)
        else:
            skipped.append(f"{p}: {why}")
    return files, skipped


def warn_skipped(skipped: list[str], stacklevel: int = 2) -> None:
    """The one warning that lists every entry a walk skipped (nothing when there are none)."""
    if skipped:
        warnings.warn(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not "
                      "readable image files: " + "; ".join(skipped), stacklevel=stacklevel + 1)


def expand_image_paths(paths, skipped: list[str] | None = None) -> list[str]:
    """Files as given; folders replaced by the image files below them (sorted), by scan_image_files.
    Entries that are not readable files (broken or looping links, FIFOs, sockets...) are left out and
    listed in one warning, or appended to `skipped` for a caller that reports them in its own warning.
    No image file at all is a DeviseError naming the paths (and what was skipped)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out, bad = scan_image_files(paths)
    if not out:
        raise DeviseError("no image files found in: " + ", ".join(str(p) for p in paths)
                          + (f" (skipped: {'; '.join(bad)})" if bad else ""))
    if skipped is None:
        warn_skipped(bad)
    else:
        skipped.extend(bad)
    return out


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """An integer ("I", "I;16*") or float ("F") single-channel image -> "L" or "LA" with faithful 8-bit values."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise DeviseError("32-bit float image holds NaN or infinite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 255:
            raise DeviseError(f"32-bit float image with values {lo:g}..{hi:g}: outside [0, 1] and [0, 255], "
                              "no known scale to 8 bits")
        grey = values * 255 if hi <= 1 else values
    else:
        values = values.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise DeviseError(f"{image.mode} integer image with values {lo}..{hi}: outside the 16-bit range, "
                              "no known scale to 8 bits")
        grey = values * (255 / 65535)
    out = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, (int, float)) and image.mode != "F":  # 16-bit grey PNG colour key, on 16-bit values
        out.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
    return out


def _sixteen_bit_colour_key(image: Image.Image) -> bool:
    """A 16-bit colour PNG with a tRNS colour key: Pillow keeps 8 bits of each sample, not enough to match it."""
    key = image.info.get("transparency")
    if image.mode != "RGB" or not isinstance(key, tuple):
        return False
    rawmodes = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in getattr(image, "tile", None) or []]
    return max(key) > 255 or any(";16" in str(r) for r in rawmodes)


def to_rgb_image(image: Image.Image) -> Image.Image:
    """A decoded PIL image -> "RGB" or, when some pixels are transparent (alpha 0), "RGBA"; faithful 8-bit values.

    DeviseError (without a file name: the caller knows it) when the image cannot be decoded faithfully.
    """
    if _sixteen_bit_colour_key(image):  # checked before loading: the tile says how the file stores samples
        raise DeviseError("16-bit colour PNG with a transparent colour key (cannot be matched on 8-bit samples)")
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        image = _wide_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    try:
        image = image.convert("RGBA" if has_alpha else "RGB")
    except ValueError as exc:
        raise DeviseError(f"image mode {image.mode} has no conversion to RGB ({exc})") from None
    if has_alpha and image.getchannel("A").getextrema()[0] > 0:
        # No pixel is fully transparent: a photo, framed like one; translucent pixels still go on white.
        image = _on_white(image)
    return image


def _on_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image -> uint8 (size, size, 3) by the policy in the module docstring."""
    image = to_rgb_image(image)
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        box = alpha.getbbox()  # the visible pixels; None for a fully transparent image (left blank white)
        if box is not None:
            image = image.crop(box)
        image = _on_white(image)
        w, h = image.size
        square = Image.new("RGB", (max(w, h),) * 2, (255, 255, 255))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        return np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    short = round(size / CROP_FRACTION)
    w, h = image.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def describe(value) -> str:
    """A short name of what a value is, for errors (never its contents: an array's dtype and shape)."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    kind = type(value)
    return f"an object of type {kind.__qualname__ if kind.__module__ == 'builtins' else kind.__module__ + '.' + kind.__qualname__}"


def frame_array(image, size: int = 224) -> np.ndarray:
    """An image held in memory -> uint8 (size, size, 3) by the same policy as a file (to_rgb_array): a PIL
    image, or a uint8 array (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey of any size. TypeError (one line,
    naming what it got) for anything else."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) \
                or 0 in image.shape:
            raise TypeError(f"an image array must be uint8 (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey; "
                            f"got {describe(image)}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"not an image: got {describe(image)}")
    return to_rgb_array(image, size)


def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Read one image file as uint8 (size, size, 3) RGB; DeviseError naming the file if it is unreadable."""
    why = unreadable_reason(path)
    if why == "no such file":
        raise DeviseError(f"{path}: no such file")
    if why is not None:
        raise DeviseError(f"{path}: not a readable image ({why})")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DeviseError(f"image too large ({image.width}x{image.height} pixels)")
            # JPEG draft mode decodes big photos at a reduced scale: much faster, same result after resize.
            image.draft("RGB", (round(size / CROP_FRACTION),) * 2)
            return to_rgb_array(image, size)
    except DeviseError as exc:
        raise DeviseError(f"{path}: {exc}") from None
    except FileNotFoundError:
        raise DeviseError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DeviseError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def _load_or_none(args: tuple[str, int]) -> np.ndarray | str:
    path, size = args
    try:
        return load_image(path, size)
    except DeviseError as exc:
        return str(exc)


def load_images(paths: list[str], size: int = 224, workers: int | None = None,
                errors: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode many images (in threads: Pillow releases the GIL while decoding and resizing): (uint8 (N,size,size,3), valid (N,) bool).

    Unreadable files are left black, marked invalid and reported in ONE warning that lists them, or
    appended to `errors` ("PATH: why") for a caller that decodes in chunks and reports them once itself.
    """
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    valid = np.ones(len(paths), bool)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    jobs = [(str(p), size) for p in paths]
    if workers > 1 and len(paths) >= 64:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(_load_or_none, jobs, chunksize=16))
    else:
        results = [_load_or_none(job) for job in jobs]
    bad = []
    for i, result in enumerate(results):
        if isinstance(result, str):
            valid[i] = False
            bad.append(result)
        else:
            out[i] = result
    if errors is not None:
        errors.extend(bad)
    elif bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s): " + "; ".join(bad), stacklevel=2)
    return out, valid
