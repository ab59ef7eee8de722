"""JPEG files decoded on the GPU (NVIDIA nvImageCodec, the `.[gpu]` extra), framed there by the CPU policy.

On the 16-core H200 machine the CPU decoded 1,340 JPEG photos/s (threads) against a 29,650 img/s
forward: decoding was the wall. nvImageCodec decodes a batch of JPEG files on the device (nvJPEG); the
decoded pixels reach JAX through DLPack (no copy) and `frame_on_device` resizes and crops them there
with devise.data.images' policy for opaque images (short side to size/0.875, bicubic with antialiasing,
centre crop): JPEGs have no alpha, so the cut-out framing never applies. The framed uint8 rows are then
written where the CPU path writes its rows (the image store, or a chunk's array), so both paths feed the
same forward and the same caches.

What this path leaves to the CPU (devise.data.images): files that are not JPEG, JPEGs nvImageCodec cannot
decode (said by the CPU path in its own words when it cannot either), CMYK JPEGs and images over
images.MAX_PIXELS. Pillow decodes big JPEGs at a reduced DCT scale (draft), nvJPEG at full size; the
device reduces them by the same factor (a box average) before the resize, so the framed pixels differ
from the CPU path's by about half a level on average (tests/test_gpu_decode.py states the tolerance).
"""
from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from devise.data.images import CROP_FRACTION, MAX_PIXELS, _load_or_none

JPEG_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif"}
_PAD = 256  # decoded images are padded up to a multiple of this (few compiled shapes per batch)
_FRAME_BYTES = 2 << 30  # float32 pixels framed per compiled call (a batch of 12 MP photos is split)


def draft_scale(height: int, width: int, size: int) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's JPEG draft decodes at for devise.data.images.load_image (its rule)."""
    short = round(size / CROP_FRACTION)
    most = min(width // short, height // short)
    return next(s for s in (8, 4, 2, 1) if most >= s or s == 1)


def crop_geometry(height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """(scale_y, scale_x, top, left) of devise.data.images' opaque framing: resize to (new_h, new_w) with the
    short side at round(size / 0.875), then crop size x size at (top, left) of the resized image."""
    short = round(size / CROP_FRACTION)
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return new_h / height, new_w / width, float((new_h - size) // 2), float((new_w - size) // 2)


@functools.lru_cache(maxsize=None)
def _framer(size: int, draft: int):
    import jax
    import jax.numpy as jnp

    def frame(image, scale, top_left):
        x = image.astype(jnp.float32)
        if draft > 1:  # the draft's reduced DCT scale, as a box average (its ceil-sized last block is never sampled)
            x = x.reshape(x.shape[0] // draft, draft, x.shape[1] // draft, draft, 3).mean(axis=(1, 3))
        # output pixel o samples input (o + 0.5 - t) / s - 0.5: with t = -top_left it is resized pixel o + top_left
        out = jax.image.scale_and_translate(x, (size, size, 3), (0, 1), scale, -top_left, method="cubic",
                                            antialias=True)
        return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

    return jax.jit(jax.vmap(frame))


def frame_on_device(images, size: int, draft: bool = True):
    """Decoded (h, w, 3) uint8 images (JAX device arrays, or anything jnp.asarray takes) -> uint8
    (n, size, size, 3) framed as devise.data.images frames an opaque image, on the images' device.

    draft: first reduce big images as Pillow's JPEG draft does on the CPU path (by 2, 4 or 8: a box
    average standing in for the DCT scaling), so both paths give nearly the same pixels. Images are
    padded to a multiple of 256 pixels per side and framed in groups of one padded shape (a compile per
    group shape, not per image size); the crop keeps 16 resized pixels clear of every image edge at
    224 px, so the padding never reaches an output pixel."""
    import jax.numpy as jnp

    images = [jnp.asarray(im) for im in images]
    out = [None] * len(images)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        key = (-(-h // _PAD) * _PAD, -(-w // _PAD) * _PAD, draft_scale(h, w, size) if draft else 1)
        groups.setdefault(key, []).append(i)
    for (ph, pw, s), members in groups.items():
        per_call = max(1, _FRAME_BYTES // (ph * pw * 3 * 4))
        for lo in range(0, len(members), per_call):
            part = members[lo:lo + per_call]
            padded = jnp.stack([jnp.pad(images[i], ((0, ph - images[i].shape[0]), (0, pw - images[i].shape[1]), (0, 0)))
                                for i in part])
            geometry = np.array([crop_geometry(-(-images[i].shape[0] // s), -(-images[i].shape[1] // s), size)
                                 for i in part], np.float32)
            framed = _framer(size, s)(padded, jnp.asarray(geometry[:, :2]), jnp.asarray(geometry[:, 2:]))
            for j, i in enumerate(part):
                out[i] = framed[j]
    return jnp.stack(out) if out else jnp.zeros((0, size, size, 3), jnp.uint8)


class GpuJpegDecoder:
    """nvImageCodec's decoder, fed from one thread (decoding overlaps the forward, launches stay in order)."""

    def __init__(self, nvimgcodec):
        self._codec = nvimgcodec
        self._decoder = nvimgcodec.Decoder()
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.RGB,
                                               allow_any_depth=False)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="devise-gpu-decode")

    @staticmethod
    def takes(path: str) -> bool:
        return Path(path).suffix.lower() in JPEG_SUFFIXES

    def submit(self, paths: list[str], size: int, out: np.ndarray, rows: list[int]) -> Future:
        return self._thread.submit(self.decode_into, paths, size, out, rows)

    def _stream(self, path: str):
        """A CodeStream of the file, or None where the CPU path must take it (its reason said there)."""
        try:
            stream = self._codec.CodeStream(Path(path).read_bytes())
            if stream.height * stream.width > MAX_PIXELS or stream.num_channels not in (1, 3):
                return None  # too large (refused by the CPU path), CMYK/YCCK (Pillow's conversion)
            return stream
        except Exception:  # unreadable or not a JPEG nvImageCodec parses: the CPU path says why
            return None

    def decode_into(self, paths: list[str], size: int, out: np.ndarray, rows: list[int]):
        """Decode `paths` into out[rows]: (for each row None or the one-line reason it is unreadable, None)."""
        import jax.dlpack

        streams = [self._stream(p) for p in paths]
        on_gpu = [i for i, s in enumerate(streams) if s is not None]
        decoded = self._decoder.decode([streams[i] for i in on_gpu], params=self._params) if on_gpu else []
        done = [(i, image) for i, image in zip(on_gpu, decoded) if image is not None]
        if done:
            framed = np.asarray(frame_on_device([jax.dlpack.from_dlpack(image) for _, image in done], size))
            for (i, _), pixels in zip(done, framed):
                out[rows[i]] = pixels
        errors: list[str | None] = [None] * len(paths)
        for i in sorted(set(range(len(paths))) - {i for i, _ in done}):  # the CPU policy, and its errors
            result = _load_or_none((paths[i], size))
            out[rows[i]] = 0 if isinstance(result, str) else result
            errors[i] = result if isinstance(result, str) else None
        return errors, None


@functools.lru_cache(maxsize=1)
def gpu_jpeg_decoder() -> tuple[GpuJpegDecoder | None, str]:
    """(the GPU JPEG decoder, "") when JAX runs on a CUDA device and nvImageCodec starts; else (None, why not)."""
    from devise.runtime import platform

    if platform() != "gpu":
        return None, f"no CUDA device (JAX runs on {platform()})"
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None, "nvImageCodec is not installed (pip install 'devise[gpu]')"
    try:
        return GpuJpegDecoder(nvimgcodec), ""
    except Exception as exc:  # a driver or library mismatch: the CPU path still works
        return None, f"nvImageCodec did not start ({exc.__class__.__name__}: {exc})"[:300]

