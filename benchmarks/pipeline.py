"""The one pipeline (devise.data.pipeline) against today's loops, on JPEG photos, ratios in one process:
- predict/index of a folder vs cold `devise features`: model.encode_paths (what `devise predict` runs),
  encode_paths(cache=True) in an empty data home (`devise index`), extract_features in an empty data home;
- pipeline vs old loop: encode_paths against the loop it replaced (decode a chunk of 256, then forward it
  in batches of 32, each read back before the next);
- big vs small JPEGs: cold `devise features` on 48 photos of 12 MP against the same photos at 640x480.
The model embeds by ConSE over Lite0's ImageNet classifier with random class vectors (timing only: no
label encoder to load). Repeats are interleaved so load on a shared machine hits every variant alike.
RESULT lines: one per goal (`RESULT {"name": .., ...}`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import devise  # noqa: F401
import numpy as np
from PIL import Image

from devise.assets import imagenet1k_classes
from devise.data.features import extract_features
from devise.data.images import load_images
from devise.models.model import DeviseModel, random_label_vectors


def timing_model() -> DeviseModel:
    classes = imagenet1k_classes()
    names = [c["name"] for c in classes]
    return DeviseModel(method="conse", model=None, class_names=names, label_vectors=random_label_vectors(names, 384),
                       settings={"backbone": "efficientnet_lite0", "T": 10, "feature_dim": 1280},
                       class_columns=np.arange(len(names)), name="timing")


def old_encode_paths(model: DeviseModel, paths: list[str]) -> np.ndarray:
    """model.encode_paths before devise.data.pipeline: decode a chunk, then forward it, nothing overlapped."""
    rows = []
    for start in range(0, len(paths), 256):
        images, ok = load_images(paths[start:start + 256], model.backbone.image_size)
        embedded = model._encode_arrays(images)
        embedded[~ok] = 0.0
        rows.append(embedded)
    return np.concatenate(rows)


def photos(n: int, folder: Path, size: tuple[int, int] | None = None, photo_dir: str | None = None) -> list[str]:
    """n distinct JPEG files made from real photos (foolbox's 20, or photo_dir's), resized to `size` if given."""
    from devise.assets import foolbox_data_dir

    sources = sorted(Path(photo_dir).glob("*.jpg")) if photo_dir else sorted(foolbox_data_dir().glob("imagenet_*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dst = folder / f"photo_{i:05d}.jpg"
        if size is None:
            shutil.copy(sources[i % len(sources)], dst)
        else:
            Image.open(sources[i % len(sources)]).convert("RGB").resize(size, Image.BICUBIC).save(dst, quality=90)
        out.append(str(dst))
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--big", type=int, default=48, help="12 MP photos (and as many at 640x480)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--photo-dir", default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="devise-pipeline-"))
    paths = photos(args.images, scratch / "photos", photo_dir=args.photo_dir)
    big = photos(args.big, scratch / "big", (4000, 3000), args.photo_dir)
    small = photos(args.big, scratch / "small", (640, 480), args.photo_dir)
    model = timing_model()
    homes = iter(range(10 ** 6))

    def fresh_home():
        os.environ["DEVISE_HOME"] = str(scratch / f"home{next(homes)}")

    fresh_home()
    model.encode_paths(paths[:8])  # compile, start pools
    old_encode_paths(model, paths[:8])
    runs = {"predict": [], "index": [], "features": [], "old_loop": [], "big": [], "small": []}
    for _ in range(args.repeats):
        runs["predict"].append(timed(lambda: model.encode_paths(paths)))
        runs["old_loop"].append(timed(lambda: old_encode_paths(model, paths)))
        fresh_home()
        runs["index"].append(timed(lambda: model.encode_paths(paths, cache=True)))
        fresh_home()
        runs["features"].append(timed(lambda: extract_features(paths, model.backbone, progress=False)))
        fresh_home()
        runs["big"].append(timed(lambda: extract_features(big, model.backbone, progress=False)))
        fresh_home()
        runs["small"].append(timed(lambda: extract_features(small, model.backbone, progress=False)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ips = {k: (args.big if k in ("big", "small") else args.images) / s for k, s in med.items()}
    for k, v in ips.items():
        print(f"{k:10s} {v:9.1f} images/s   (median of {args.repeats})")
    shutil.rmtree(scratch, ignore_errors=True)
    print("RESULT " + json.dumps({"name": "predict_folder_vs_cold_features",
                                  "ratio": round(ips["predict"] / ips["features"], 3),
                                  "predict_images_per_s": round(ips["predict"], 1),
                                  "features_images_per_s": round(ips["features"], 1)}))
    print("RESULT " + json.dumps({"name": "index_folder_vs_cold_features",
                                  "ratio": round(ips["index"] / ips["features"], 3),
                                  "index_images_per_s": round(ips["index"], 1)}))
    print("RESULT " + json.dumps({"name": "pipeline_vs_old_loop", "ratio": round(ips["predict"] / ips["old_loop"], 3),
                                  "old_loop_images_per_s": round(ips["old_loop"], 1)}))
    print("RESULT " + json.dumps({"name": "big_vs_small_jpeg_features_time", "ratio": round(med["big"] / med["small"], 3),
                                  "big_images_per_s": round(ips["big"], 1), "small_images_per_s": round(ips["small"], 1)}))


if __name__ == "__main__":
    main()
