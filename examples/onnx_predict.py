"""Top-5 labels of images from a `devise export` folder, with onnxruntime, numpy and Pillow only.

    python examples/onnx_predict.py EXPORT_DIR IMAGE...     # prints what `devise predict IMAGE` prints
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def frame(path, size, crop_fraction):
    """devise's framing (manifest "framing"): a photo's short side to size / crop_fraction, centre crop;
    a cut-out (some pixel fully transparent) cropped to its visible pixels on a white square."""
    image = Image.open(path)
    image.draft("RGB", (round(size / crop_fraction),) * 2)  # JPEG: decode at a reduced scale, as devise does
    image = ImageOps.exif_transpose(image).convert("RGBA")
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] == 0:
        image = image.crop(alpha.getbbox() or (0, 0, *image.size))
        square = Image.new("RGBA", (max(image.size),) * 2, "white")
        square.alpha_composite(image, ((square.width - image.width) // 2, (square.height - image.height) // 2))
        return np.asarray(square.convert("RGB").resize((size, size), Image.BICUBIC))
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    scale = round(size / crop_fraction) / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size)))


if __name__ == "__main__":
    folder, paths = Path(sys.argv[1]), sys.argv[2:]
    manifest = json.loads((folder / "manifest.json").read_text())
    images = np.stack([frame(p, manifest["image"]["size"], manifest["framing"]["crop_fraction"]) for p in paths])
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: shared cores
    session = onnxruntime.InferenceSession(str(folder / "image.onnx"), options, providers=["CPUExecutionProvider"])
    scores = session.run(None, {"images": images})[0] @ np.load(folder / "labels.npy").T
    labels = [line.split("\t") for line in (folder / "labels.txt").read_text().splitlines()]
    for path, row in zip(paths, scores):
        print(path)
        for rank, i in enumerate(np.argsort(-row, kind="stable")[:5], 1):
            label, synset = labels[i]
            print(f"  {rank}. {row[i]:+.3f}  {label}" + (f"  ({synset})" if synset else ""))
