"""Decoding images into the uint8 arrays every backbone takes.

One resize policy everywhere (the usual ImageNet evaluation): short side to size/0.875, centre crop to
size (256 -> 224). Transparency is composited on white (emoji artwork has transparent backgrounds).
"""
from __future__ import annotations

import os
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


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Image files below a folder, nested folders included, sorted; hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and is_image_file(f)]
    return found


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """A decoded PIL image -> uint8 (size, size, 3): alpha on white, resize short side, centre crop."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    short = round(size / CROP_FRACTION)
    w, h = image.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Read one image file as uint8 (size, size, 3) RGB; DeviseError naming the file if it is unreadable."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DeviseError(f"{path}: image too large ({image.width}x{image.height} pixels)")
            # JPEG draft mode decodes big photos at a reduced scale: much faster, same result after resize.
            image.draft("RGB", (round(size / CROP_FRACTION),) * 2)
            return to_rgb_array(image, size)
    except DeviseError:
        raise
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


def load_images(paths: list[str], size: int = 224, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode many images (in threads: Pillow releases the GIL while decoding and resizing): (uint8 (N,size,size,3), valid (N,) bool).

    Unreadable files are left black, marked invalid and reported in ONE warning that lists them.
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
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s): " + "; ".join(bad), stacklevel=2)
    return out, valid
