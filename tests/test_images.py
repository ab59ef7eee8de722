"""The one decode policy (devise.data.images) on real photos: every mode Pillow opens, made from skimage's
chelsea / coffee, decodes to the same 8-bit RGB as the 8-bit original; cut-outs are framed whole; the
one folder walker skips what is not a readable image file."""
import os
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, PngImagePlugin

from devise.errors import DeviseError
from devise.data.images import (
    CROP_FRACTION, POLICY_VERSION, load_image, load_images, scan_image_files, to_rgb_array,
)

SIZE = 224


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture(scope="module")
def grey(chelsea) -> np.ndarray:
    return np.asarray(chelsea.convert("L"))


def _decode(tmp_path, image: Image.Image, name: str, **save) -> np.ndarray:
    path = tmp_path / name
    image.save(path, **save)
    return load_image(path, SIZE)


def _assert_close(got: np.ndarray, want: np.ndarray, mean_tol: float) -> None:
    assert got.shape == want.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() <= mean_tol, f"mean abs difference {diff.mean():.2f} > {mean_tol}"


def _write_png16(path, samples: np.ndarray, trns: tuple | None = None) -> None:
    """A 16-bit colour PNG (RGB or RGBA). Pillow cannot write one and nothing installed can, so the three
    chunks are written here (Pillow's own putchunk adds the CRCs); rows use filter 0 (none)."""
    h, w, channels = samples.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        PngImagePlugin.putchunk(fh, b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[channels], 0, 0, 0))
        if trns is not None:
            PngImagePlugin.putchunk(fh, b"tRNS", struct.pack(">HHH", *trns))
        PngImagePlugin.putchunk(fh, b"IDAT", zlib.compress(rows))
        PngImagePlugin.putchunk(fh, b"IEND", b"")


def _ellipse_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, size[0] - 1, size[1] - 1), fill=255)
    return mask


# ---------------------------------------------------------------- 16-bit and 32-bit samples

def test_16bit_grey_png_decodes_like_the_8bit_original_not_white(tmp_path, chelsea, grey):
    """The bug: Pillow's convert("RGB") clips 16-bit samples at 255, so chelsea became all white."""
    want = _decode(tmp_path, Image.fromarray(grey), "grey8.png")
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # 0..255 -> 0..65535
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # Pillow 11+ / Pillow 10
    got = load_image(path, SIZE)
    assert got.min() < 100 and got.mean() < 200, "16-bit PNG decoded (nearly) white"
    _assert_close(got, want, 0.01)


def test_16bit_big_endian_tiff(tmp_path, grey):
    want = _decode(tmp_path, Image.fromarray(grey), "grey8.png")
    big = (grey.astype(np.uint16) * 257).astype(">u2")
    image = Image.frombuffer("I;16B", (grey.shape[1], grey.shape[0]), big.tobytes(), "raw", "I;16B", 0, 1)
    path = tmp_path / "grey16b.tif"
    image.save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16B"
    _assert_close(load_image(path, SIZE), want, 0.01)


def test_32bit_integer_images_as_16bit_samples(tmp_path, grey):
    """Mode "I": what a 32-bit integer TIFF and a 16-bit PGM (Pillow scales its maxval to 65535) open as."""
    want = _decode(tmp_path, Image.fromarray(grey), "grey8.png")
    tif = tmp_path / "grey32.tif"
    Image.fromarray(grey.astype(np.int32) * 257).save(tif)
    pgm = tmp_path / "grey16.pgm"
    header = f"P5\n{grey.shape[1]} {grey.shape[0]}\n1000\n".encode()  # maxval 1000: a 10-bit scan
    pgm.write_bytes(header + np.rint(grey / 255 * 1000).astype(">u2").tobytes())
    for path in (tif, pgm):
        with Image.open(path) as raw:
            assert raw.mode == "I"
        _assert_close(load_image(path, SIZE), want, 0.6)

    wide = tmp_path / "wide.tif"
    Image.fromarray(grey.astype(np.int32) * 1_000_000).save(wide)  # far beyond 16 bits: no known scale
    with pytest.raises(DeviseError, match=r"wide\.tif: .*outside the 16-bit range"):
        load_image(wide, SIZE)


def test_16bit_colour_pngs(tmp_path, chelsea):
    rgb = np.asarray(chelsea)
    want = _decode(tmp_path, chelsea, "rgb8.png")
    _write_png16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    with Image.open(tmp_path / "rgb16.png") as raw:
        assert raw.mode == "RGB"  # Pillow keeps each sample's high byte
    got = load_image(tmp_path / "rgb16.png", SIZE)
    _assert_close(got, want, 0.0)

    # RGBA 16-bit with an elliptical cut-out, against the same cut-out in 8 bits
    mask = np.asarray(_ellipse_mask(chelsea.size))
    rgba8 = np.dstack([rgb, mask])
    want = _decode(tmp_path, Image.fromarray(rgba8), "rgba8.png")
    _write_png16(tmp_path / "rgba16.png", rgba8.astype(np.uint16) * 257)
    _assert_close(load_image(tmp_path / "rgba16.png", SIZE), want, 0.0)

    # a 16-bit colour key cannot be matched on the 8 bits Pillow keeps: an error, not a guess
    _write_png16(tmp_path / "keyed16.png", rgb.astype(np.uint16) * 257, trns=(65535, 0, 257))
    with pytest.raises(DeviseError, match=r"keyed16\.png: 16-bit colour PNG with a transparent colour key"):
        load_image(tmp_path / "keyed16.png", SIZE)


def test_16bit_colour_tiff(tmp_path, chelsea):
    import tifffile

    want = _decode(tmp_path, chelsea, "rgb8.png")
    tifffile.imwrite(tmp_path / "rgb16.tif", np.asarray(chelsea).astype(np.uint16) * 257, photometric="rgb")
    _assert_close(load_image(tmp_path / "rgb16.tif", SIZE), want, 0.0)


def test_float_tiff_scaling(tmp_path, grey):
    want = _decode(tmp_path, Image.fromarray(grey), "grey8.png")
    unit = tmp_path / "unit.tif"
    Image.fromarray((grey / 255).astype(np.float32)).save(unit)
    eight = tmp_path / "eight.tif"
    Image.fromarray(grey.astype(np.float32)).save(eight)
    for path in (unit, eight):
        with Image.open(path) as raw:
            assert raw.mode == "F"
        _assert_close(load_image(path, SIZE), want, 0.01)
    for name, values in [("hdr.tif", grey.astype(np.float32) * 40), ("signed.tif", grey.astype(np.float32) - 128)]:
        Image.fromarray(values).save(tmp_path / name)
        with pytest.raises(DeviseError, match=rf"{name}: 32-bit float image with values .*no known scale"):
            load_image(tmp_path / name, SIZE)


# ---------------------------------------------------------------- other modes

def test_1bit(tmp_path, grey):
    bits = grey >= 128
    want = _decode(tmp_path, Image.fromarray((bits * 255).astype(np.uint8)), "thresholded8.png")
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "1"
    _assert_close(load_image(path, SIZE), want, 0.0)


def test_palette_with_transparency(tmp_path, chelsea):
    mask = _ellipse_mask(chelsea.size)
    cutout = chelsea.copy()
    cutout.putalpha(mask)
    want = _decode(tmp_path, cutout, "cutout8.png")
    palette = chelsea.quantize(255)  # index 255 is free for the transparent colour
    indices = np.where(np.asarray(mask) > 0, np.asarray(palette), 255).astype(np.uint8)
    image = Image.fromarray(indices)
    image.putpalette(palette.getpalette()[:765] + [0, 0, 0])
    path = tmp_path / "palette.png"
    image.save(path, transparency=255)
    with Image.open(path) as raw:
        assert raw.mode == "P" and raw.info["transparency"] == 255
    got = load_image(path, SIZE)
    _assert_close(got, want, 4.0)  # 255 colours
    assert (got[0, 0] == 255).all()  # the transparent corner is white, not black (index 255's colour)


def test_grey_with_alpha(tmp_path, chelsea, grey):
    alpha = np.asarray(_ellipse_mask(chelsea.size))
    want = _decode(tmp_path, Image.fromarray(np.dstack([grey, grey, grey, alpha])), "rgba.png")
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([grey, alpha])).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "LA"
    _assert_close(load_image(path, SIZE), want, 0.0)


def test_cmyk(tmp_path, chelsea):
    want = _decode(tmp_path, chelsea, "rgb8.png")
    cmyk = chelsea.convert("CMYK")
    for name, tol in [("cmyk.tif", 0.0), ("cmyk.jpg", 2.0)]:
        cmyk.save(tmp_path / name, **({"quality": 95} if name.endswith("jpg") else {}))
        with Image.open(tmp_path / name) as raw:
            assert raw.mode == "CMYK"
        _assert_close(load_image(tmp_path / name, SIZE), want, tol)


def test_exif_rotated_jpeg(tmp_path, chelsea):
    want = _decode(tmp_path, chelsea, "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: turn 90 degrees clockwise to display
    sideways = chelsea.transpose(Image.Transpose.ROTATE_90)  # stored turned counter-clockwise, like a phone's
    got = _decode(tmp_path, sideways, "sideways.jpg", quality=95, exif=exif.tobytes())
    _assert_close(got, want, 2.0)


def test_opaque_photo_keeps_the_imagenet_crop(chelsea):
    """Short side to 256, centre crop 224: the framing every backbone was evaluated with."""
    w, h = chelsea.size
    short = round(SIZE / CROP_FRACTION)
    resized = chelsea.resize((round(w * short / h), short), Image.BICUBIC)
    left = (resized.width - SIZE) // 2
    want = np.asarray(resized.crop((left, (short - SIZE) // 2, left + SIZE, (short - SIZE) // 2 + SIZE)))
    np.testing.assert_array_equal(to_rgb_array(chelsea, SIZE), want)
    # an alpha channel with no transparent pixel does not make it a cut-out
    opaque = chelsea.copy()
    opaque.putalpha(255)
    np.testing.assert_array_equal(to_rgb_array(opaque, SIZE), want)


# ---------------------------------------------------------------- cut-outs

def test_cutout_off_centre_on_a_wide_canvas_is_kept_whole(tmp_path):
    """coffee (600x400) cut out with an ellipse, at the left of a 1400x700 transparent canvas: the old
    centre crop kept the middle of the canvas (cutting the cup away); now the cup fills the frame."""
    import skimage.data

    coffee = Image.fromarray(skimage.data.coffee())
    cutout = coffee.copy()
    cutout.putalpha(_ellipse_mask(coffee.size))
    canvas = Image.new("RGBA", (1400, 700), (0, 0, 0, 0))
    canvas.paste(cutout, (60, 200))
    path = tmp_path / "cutout.png"
    canvas.save(path)
    got = load_image(path, SIZE)

    subject = np.flatnonzero((np.abs(got.astype(int) - 255).sum(axis=2) > 30).any(axis=0))
    assert subject.min() <= 2 and subject.max() >= SIZE - 3, f"subject spans columns {subject.min()}..{subject.max()}"
    # exactly the cut-out on white, padded to a square, resized
    on_white = Image.new("RGB", coffee.size, (255, 255, 255))
    on_white.paste(coffee, (0, 0), _ellipse_mask(coffee.size))
    square = Image.new("RGB", (600, 600), (255, 255, 255))
    square.paste(on_white, (0, 100))
    _assert_close(got, np.asarray(square.resize((SIZE, SIZE), Image.BICUBIC)), 0.5)

    # the old policy (white composite, then the ImageNet centre crop) loses both sides of the cup
    flat = Image.alpha_composite(Image.new("RGBA", canvas.size, (255, 255, 255, 255)), canvas).convert("RGB")
    old = to_rgb_array(flat, SIZE)
    old_subject = np.flatnonzero((np.abs(old.astype(int) - 255).sum(axis=2) > 30).any(axis=0))
    assert old_subject.size == 0 or old_subject.min() > 2 or old_subject.max() < SIZE - 3


def test_fully_transparent_image_is_blank_white(tmp_path):
    path = tmp_path / "empty.png"
    Image.new("RGBA", (300, 200), (0, 0, 0, 0)).save(path)
    assert (load_image(path, SIZE) == 255).all()


def test_policy_version_keys_the_image_store(monkeypatch):
    """Caches are keyed by the policy: the image store folder (and so the feature cache) moves with it."""
    from devise.data import features

    assert features.IMAGE_POLICY_VERSION == POLICY_VERSION and not POLICY_VERSION.startswith("v1")
    before = features.image_store_folder(["a.jpg"], SIZE)
    monkeypatch.setattr(features, "IMAGE_POLICY_VERSION", POLICY_VERSION + "-next")
    assert features.image_store_folder(["a.jpg"], SIZE) != before


# ---------------------------------------------------------------- the folder walker

@pytest.fixture
def messy_folder(tmp_path, chelsea):
    """A good photo beside entries that are not readable image files (root ignores chmod, so no
    permission case): a broken link, a looping link, a FIFO, a socket, a link to a folder; and a real
    folder named like an image, whose photo is found like any nested folder's."""
    root = tmp_path / "messy"
    root.mkdir()
    chelsea.save(root / "good.jpg")
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    os.mkfifo(root / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket.png"))
    (root / "album.png").mkdir()
    chelsea.save(root / "album.png" / "inner.png")
    (root / "linked.jpg").symlink_to(root / "album.png")
    yield root
    sock.close()


BAD_ENTRIES = {"broken.jpg": "broken symbolic link", "loop.jpg": "symbolic link loop",
               "fifo.jpg": "named pipe", "socket.png": "socket", "linked.jpg": "link to a folder"}


def test_walker_skips_what_is_not_a_readable_file(messy_folder, fail_after):
    with fail_after(20):
        files, skipped = scan_image_files([messy_folder])
    assert files == [str(messy_folder / "good.jpg"), str(messy_folder / "album.png" / "inner.png")]
    assert len(skipped) == len(BAD_ENTRIES)
    for name, why in BAD_ENTRIES.items():
        assert any(s.startswith(f"{messy_folder / name}: ") and why in s for s in skipped), (name, skipped)
    # the same policy for entries named one by one; a path that does not exist at all is an error
    files, skipped = scan_image_files([messy_folder / "fifo.jpg", messy_folder / "good.jpg"])
    assert files == [str(messy_folder / "good.jpg")] and "named pipe" in skipped[0]
    with pytest.raises(DeviseError, match="nothing.jpg: no such file or folder"):
        scan_image_files([messy_folder / "nothing.jpg"])


def test_decoding_never_opens_a_fifo(messy_folder, fail_after):
    with fail_after(20), pytest.raises(DeviseError, match=r"fifo\.jpg: not a readable image \(a named pipe"):
        load_image(messy_folder / "fifo.jpg", SIZE)
    paths = [str(messy_folder / n) for n in ("good.jpg", "fifo.jpg", "loop.jpg")]
    with fail_after(20), pytest.warns(UserWarning, match="skipped 2 unreadable"):
        images, valid = load_images(paths, SIZE)
    assert valid.tolist() == [True, False, False] and images[0].std() > 20
