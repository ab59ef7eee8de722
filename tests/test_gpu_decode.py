"""The GPU decode path on a CPU (CI never has a GPU): the dispatcher picks the CPU here and says so once;
the on-device framing matches devise.data.images' policy on the same decoded pixels; the GPU decoder's
plumbing (rows, CPU fallback, errors) fills the store as the CPU path does, with nvImageCodec replaced by
Pillow (the only stand-in: nvImageCodec needs CUDA)."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from devise.data import pipeline
from devise.data.features import build_image_store
from devise.data.gpu_decode import GpuJpegDecoder, crop_geometry, frame_on_device, gpu_jpeg_decoder
from devise.data.images import to_rgb_array

# Stated tolerances. On the same decoded pixels: JAX's antialiased Keys cubic in float32 against Pillow's
# bicubic, which rounds to 8 bits between its passes (measured: mean 0.08-0.20 levels, max 8).
MEAN_LEVELS, MAX_LEVELS = 0.3, 8
# Against the CPU path on JPEG files, where Pillow decodes at a reduced DCT scale (draft) and the device
# box-averages a full decode (foolbox's 20 photos, measured: mean 0.61 levels, the worst photo 3.04, 99th
# percentile of a photo's pixels at most 19).
DRAFT_MEAN, DRAFT_WORST_MEAN, DRAFT_P99 = 1.0, 3.5, 24


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_dispatcher_chooses_the_cpu_here_and_says_so_once(capsys):
    gpu, reason = gpu_jpeg_decoder()
    assert gpu is None and reason == "no CUDA device (JAX runs on cpu)"
    pipeline._SAID.clear()
    first = pipeline.choose_decoder("auto", workers=2)
    again = pipeline.choose_decoder("gpu", workers=2)  # asked for, not possible: the CPU, same line
    assert first.gpu is None and again.gpu is None and first.mode == "threads"  # 2 cores: threads
    err = capsys.readouterr().err
    assert err == "decoding: CPU (2 threads); no CUDA device (JAX runs on cpu)\n"
    assert pipeline.choose_decoder("processes", workers=2, say=False).mode == "processes"


def test_cpu_mode_by_cores_and_the_main_guard(monkeypatch, tmp_path):
    assert pipeline.cpu_decode_mode(2) == "threads"
    script = tmp_path / "script.py"
    script.write_text("import devise\n")  # a user's script without the guard: spawning would re-run it
    main = type(sys)("__main__")
    main.__file__, main.__spec__ = str(script), None
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert pipeline.cpu_decode_mode(16) == "threads"
    script.write_text("import devise\nif __name__ == '__main__':\n    pass\n")
    assert pipeline.cpu_decode_mode(16) == "processes"


def _photos():
    from skimage import data

    chelsea, coffee = data.chelsea(), data.coffee()  # 451x300, 600x400
    big = np.asarray(Image.fromarray(coffee).resize((4000, 3000), Image.BICUBIC))  # a 12 MP photo
    return [chelsea, coffee, np.ascontiguousarray(chelsea.transpose(1, 0, 2)), big, coffee[:257, :300]]


def test_on_device_framing_matches_the_cpu_policy():
    photos = _photos()
    framed = np.asarray(frame_on_device(photos, 224, draft=False))
    assert framed.shape == (len(photos), 224, 224, 3) and framed.dtype == np.uint8
    for got, photo in zip(framed, photos):
        want = to_rgb_array(Image.fromarray(photo), 224)
        diff = np.abs(got.astype(int) - want)
        assert diff.mean() < MEAN_LEVELS and diff.max() <= MAX_LEVELS, (photo.shape, diff.mean(), diff.max())
    assert crop_geometry(300, 451, 224) == (256 / 300, 385 / 451, 16.0, 80.0)


class _PillowCodec:
    """nvImageCodec's interface as GpuJpegDecoder uses it, decoding with Pillow on the CPU."""

    class ColorSpec:
        RGB = "rgb"

    class DecodeParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class CodeStream:
        def __init__(self, data: bytes):
            import io

            self.image = Image.open(io.BytesIO(data))
            if self.image.format != "JPEG":
                raise RuntimeError("not a JPEG")
            self.height, self.width = self.image.height, self.image.width
            self.num_channels = len(self.image.getbands())

    class Decoder:
        def decode(self, streams, params):
            return [np.array(s.image.convert("RGB")) if s.width != 640 else None for s in streams]  # 640: fails


def test_gpu_decoder_plumbing_fills_the_store_like_the_cpu_path(home, foolbox_photos, tmp_path):
    fails = tmp_path / "fails_on_gpu.jpg"  # nvImageCodec returns None for it: the CPU decodes it
    Image.open(foolbox_photos[0]).resize((640, 480)).save(fails)
    png = tmp_path / "icon.png"
    Image.open(foolbox_photos[1]).save(png)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [str(p) for p in foolbox_photos[:6]] + [str(fails), str(png), str(broken)] + [str(foolbox_photos[6])]
    with pytest.warns(UserWarning, match="broken.jpg"):
        cpu, cpu_valid, _ = build_image_store(paths, 224, chunk_size=4, decode="threads", progress=False)
    cpu = np.array(cpu)
    shutil.rmtree(home / "images")
    decoder = pipeline.Decoder("threads", 2, GpuJpegDecoder(_PillowCodec))
    assert decoder.describe().startswith("decoding: JPEG on the GPU")
    out = np.zeros((len(paths), 224, 224, 3), np.uint8)
    valid, errors = [], []
    for _, lo, hi, rows, ok, errs in pipeline.decode_chunks(paths, 224, 4, decoder):
        out[lo:hi] = rows
        valid += ok.tolist()
        errors += errs
    decoder.close()
    assert valid == cpu_valid.tolist() and valid == [True] * 8 + [False, True]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    diff = np.abs(out.astype(int) - cpu)
    assert diff[[6, 7, 8]].max() == 0  # the CPU path's own rows: identical
    per_photo = diff.reshape(len(paths), -1)
    assert diff.mean() < DRAFT_MEAN and per_photo.mean(axis=1).max() < DRAFT_WORST_MEAN
    assert np.percentile(per_photo, 99, axis=1).max() <= DRAFT_P99
    assert decoder.policy != pipeline.choose_decoder("threads", say=False).policy == ""  # its own store key
