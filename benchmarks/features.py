"""Images/s of `devise features` against the backbone's own jitted forward on the same images in the
same process, and against one `model.predict` per image as the Keras blog did. Side by side:
- forward only: the compiled forward on uint8 batches already in memory;
- decode only: decoding + resizing the files into the uint8 store (threads, the default), no forward;
- from the store: features with the uint8 store already built (store read + forward + cache write);
- cold: features from the image files in an empty data home (decode + store + forward + cache write);
- decode only in threads and in spawned processes (`decode="threads"` / `"processes"`), same files: the
  CPU default mode here (devise.data.pipeline.cpu_decode_mode) against the better of the two; on a GPU with
  nvImageCodec the default decode (and cold features) decode JPEGs on the GPU.
Images: N emoji benchmark images (PNG) if it is built, else (or with --photos) copies of foolbox's 20
ImageNet JPEG photos. Repeats are interleaved so load on a noisy machine hits every variant alike.
Last line: RESULT {"images_per_s": .., "ratio_vs_forward": .., "ratio_vs_per_image_predict": .., ...}
(images_per_s and ratio_vs_forward are the cold run's).
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

from devise.models.backbones import load_backbone
from devise.data.features import backbone_forward, build_image_store, extract_features
from devise.data.images import load_images
from devise.data.pipeline import choose_decoder, cpu_decode_mode
from devise.runtime import default_batch_size, pad_batch, platform


def benchmark_images(n: int, scratch: Path, photos: bool = False, photo_dir: str | None = None) -> list[str]:
    from devise.assets import data_home

    emoji = data_home() / "emoji" / "images"
    paths = sorted(str(p) for p in emoji.glob("*/*.png"))[:: 7][:n] if emoji.exists() and not photos else []
    return paths if len(paths) >= n else benchmark_photos(n, scratch, photo_dir)


def benchmark_photos(n: int, scratch: Path, photo_dir: str | None = None) -> list[str]:
    """n copies (distinct files) of real JPEG photos: foolbox's 20 ImageNet photos, or photo_dir's."""
    from devise.assets import foolbox_data_dir

    photos = sorted(Path(photo_dir).glob("*.jpg")) if photo_dir else sorted(foolbox_data_dir().glob("imagenet_*.jpg"))
    if not photos:
        raise SystemExit(f"no .jpg photos in {photo_dir}")
    out = []
    for i in range(n):
        dst = scratch / f"photo_{i:05d}.jpg"
        shutil.copy(photos[i % len(photos)], dst)
        out.append(str(dst))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-image", type=int, default=96, help="images for the one-predict-per-image baseline")
    parser.add_argument("--photos", action="store_true", help="JPEG photos instead of the emoji PNGs")
    parser.add_argument("--photo-dir", default=None, help="folder of JPEG photos (default: foolbox's)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="devise-bench-"))
    paths = benchmark_images(args.images, scratch, args.photos, args.photo_dir)
    backbone = load_backbone("efficientnet_lite0")
    args.batch_size = args.batch_size or default_batch_size()
    batch = load_images(paths, backbone.image_size)[0]  # decoded in memory: the raw forward's input
    forward = backbone_forward(backbone)

    def raw_forward():
        for start in range(0, len(batch), args.batch_size):
            feats, logits = forward(pad_batch(batch[start:start + args.batch_size], args.batch_size))
        np.asarray(feats)

    raw_forward()  # compile
    os.environ["DEVISE_HOME"] = str(scratch / "warm")
    build_image_store(paths[:32], backbone.image_size, decode="processes", progress=False)  # start the workers
    forward_s, cached_s, decode_s, store_s, processes_s, threads_s = [], [], [], [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        raw_forward()
        forward_s.append(time.perf_counter() - t)
        os.environ["DEVISE_HOME"] = str(scratch / f"home{r}")
        t = time.perf_counter()
        fs = extract_features(paths, backbone, batch_size=args.batch_size, progress=False)
        cached_s.append(time.perf_counter() - t)
        assert fs.valid.all()
        shutil.rmtree(fs.folder)  # keep the uint8 store, drop the features: features from the store
        t = time.perf_counter()
        extract_features(paths, backbone, batch_size=args.batch_size, progress=False)
        store_s.append(time.perf_counter() - t)
        os.environ["DEVISE_HOME"] = str(scratch / f"decode{r}")
        t = time.perf_counter()
        build_image_store(paths, backbone.image_size, progress=False)
        decode_s.append(time.perf_counter() - t)
        os.environ["DEVISE_HOME"] = str(scratch / f"decode-processes{r}")
        t = time.perf_counter()
        build_image_store(paths, backbone.image_size, decode="processes", progress=False)
        processes_s.append(time.perf_counter() - t)
        os.environ["DEVISE_HOME"] = str(scratch / f"decode-threads{r}")
        t = time.perf_counter()
        build_image_store(paths, backbone.image_size, decode="threads", progress=False)
        threads_s.append(time.perf_counter() - t)

    # The Keras blog's way: one model.predict call per image.
    model = backbone.features_model
    model.predict(batch[:1], verbose=0)
    t = time.perf_counter()
    for i in range(args.per_image):
        model.predict(batch[i:i + 1], verbose=0)
    per_image_ips = args.per_image / (time.perf_counter() - t)

    forward_ips = len(paths) / statistics.median(forward_s)
    features_ips = len(paths) / statistics.median(cached_s)
    store_ips = len(paths) / statistics.median(store_s)
    decode_ips = len(paths) / statistics.median(decode_s)
    processes_ips = len(paths) / statistics.median(processes_s)
    threads_ips = len(paths) / statistics.median(threads_s)
    cpu_mode = cpu_decode_mode()
    print(f"platform {platform()}, {len(paths)} images ({Path(paths[0]).parent.parent.name}), batch {args.batch_size}")
    print(f"jitted forward only     {forward_ips:8.1f} images/s   (median of {args.repeats})")
    print(f"decode only             {decode_ips:8.1f} images/s   files -> uint8 store, the default: "
          f"{choose_decoder(say=False).describe()}")
    print(f"features from the store {store_ips:8.1f} images/s   store read + forward + cache write")
    print(f"devise features (cold)  {features_ips:8.1f} images/s   decode + store + forward + cache write")
    print(f"model.predict per image {per_image_ips:8.1f} images/s   ({args.per_image} images)")
    print(f"decode only, processes  {processes_ips:8.1f} images/s   the same in {os.cpu_count()} spawned processes "
          "(started once, reused)")
    print(f"decode only, threads    {threads_ips:8.1f} images/s   the same in {os.cpu_count()} threads; "
          f"CPU default here: {cpu_mode}")
    shutil.rmtree(scratch, ignore_errors=True)
    print("RESULT " + json.dumps({
        "images_per_s": round(features_ips, 1),
        "ratio_vs_forward": round(features_ips / forward_ips, 3),
        "ratio_vs_per_image_predict": round(features_ips / per_image_ips, 2),
        "forward_images_per_s": round(forward_ips, 1),
        "store_ratio_vs_forward": round(store_ips / forward_ips, 3),
        "cold_ratio_vs_decode_only": round(features_ips / decode_ips, 3),
        # decode and forward overlap: the cold run against the slower of the two (decode on a GPU)
        "cold_ratio_vs_bottleneck": round(features_ips / min(decode_ips, forward_ips), 3),
        "decode_images_per_s": round(decode_ips, 1),
        "per_image_predict_images_per_s": round(per_image_ips, 1),
        "decode_threads_vs_processes": round(threads_ips / processes_ips, 3),
        "cpu_default_mode": cpu_mode,
        "cpu_default_vs_best_mode": round({"threads": threads_ips, "processes": processes_ips}[cpu_mode]
                                          / max(threads_ips, processes_ips), 3),
    }))


if __name__ == "__main__":
    main()
