"""Seconds per training epoch on cached features vs the Keras blog's way (the frozen backbone recomputed
every epoch), on the same emoji images (or, with --photos N, copies of real JPEG photos), in one process.

- cached: the DeViSE linear head + hinge rank loss fit on the cached features of the emoji training
  images (every seen-class image outside the held-out style), timed over epochs after the first.
- recompute: one Keras model backbone (frozen) + the same head and loss, fit from uint8 images of a
  seeded subset (default 256) already decoded in memory, so this side pays neither decoding nor disk:
  a lower bound on the blog's cost. Its seconds per image are scaled to the full training set.
- cache time: extract_features on the subset from an EMPTY data home (decode + forward + write), per
  image, scaled to the training set: the 10-epoch figure is cache_time + 10 * cached vs 10 * recompute.
The training images' feature cache is built first if missing (not timed).

Last line: RESULT {"epoch_s_cached": .., "epoch_s_recompute": .., "speedup_10_epochs": ..,
"speedup_per_epoch": .., "steps_per_s_cached": ..}
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import devise  # noqa: F401
import keras
import numpy as np


def _epoch_seconds(model, x, y, batch_size, epochs):
    """Median wall seconds of an epoch, the first (compiling) epoch excluded."""
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(x, y, batch_size=batch_size, epochs=epochs + 1, shuffle=True, verbose=0, callbacks=[Timer()])
    return float(np.median(times[1:]))


def emoji_training_set():
    """(paths, labels, label vectors) of the emoji benchmark's training images (seen classes, split seed 0)."""
    from devise.data.datasets import load_dataset, zero_shot_split
    from devise.training.train import class_label_vectors
    from devise.labels.vectors import GLOVE_SPEC, load_vectors

    dataset = load_dataset("emoji")
    split = zero_shot_split(dataset, seed=0)
    vectors, kept, _ = class_label_vectors(dataset, load_vectors(GLOVE_SPEC), drop_missing=True)
    train_images = split.train[kept[dataset.labels[split.train]]]
    classes = np.unique(dataset.labels[train_images])
    labels = np.searchsorted(classes, dataset.labels[train_images])
    return [dataset.paths[i] for i in train_images], labels, vectors[classes]


def photo_training_set(n: int, photo_dir: str | None, classes: int = 100, dim: int = 50):
    """n copies of real JPEG photos with round-robin labels and random unit label vectors: for timing only
    (a GPU machine with no emoji benchmark or GloVe; the seconds do not depend on the values)."""
    from features import benchmark_photos

    paths = benchmark_photos(n, Path(tempfile.mkdtemp(prefix="devise-train-photos-")), photo_dir)
    vectors = np.random.default_rng(0).standard_normal((classes, dim)).astype(np.float32)
    return paths, np.arange(n) % classes, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=256, help="images for the recompute side and cache timing")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side (after a warm-up epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--photos", type=int, default=0,
                        help="N copies of foolbox's ImageNet photos instead of the emoji benchmark (no GloVe needed)")
    parser.add_argument("--photo-dir", default=None, help="folder of JPEG photos for --photos (default: foolbox's)")
    args = parser.parse_args()

    from devise.models.backbones import load_backbone
    from devise.data.features import build_image_store, extract_features
    from devise.models.heads import linear_head
    from devise.training.losses import HingeRankLoss

    if args.photos:
        paths, labels, label_vectors = photo_training_set(args.photos, args.photo_dir)
        print(f"photo copies (timing only, random label vectors): {len(paths)} images of {len(label_vectors)} classes")
    else:
        paths, labels, label_vectors = emoji_training_set()
        print(f"emoji training set: {len(paths)} images of {len(label_vectors)} classes")
    backbone = load_backbone()
    n_train = len(paths)

    # --- cached features (building the full cache is not timed here; its cost is measured below)
    x_cached = np.asarray(extract_features(paths, backbone, progress=True).features, np.float32)
    keras.utils.set_random_seed(0)
    head = linear_head(backbone.feature_dim, label_vectors.shape[1])
    loss = HingeRankLoss(label_vectors, seed=0)
    head.hinge_loss_seed = loss.seed_generator
    head.compile(optimizer="adam", loss=loss)
    epoch_s_cached = _epoch_seconds(head, x_cached, labels, args.batch_size, args.epochs)
    print(f"cached: {epoch_s_cached:.3f} s/epoch for {n_train} images")

    # --- the same subset for the recompute side and the cache timing
    subset = np.random.default_rng(0).choice(n_train, min(args.subset, n_train), replace=False)
    subset_paths = [paths[i] for i in subset]
    home = os.environ.get("DEVISE_HOME")
    with tempfile.TemporaryDirectory(prefix="devise-bench-home-") as empty_home:
        os.environ["DEVISE_HOME"] = empty_home
        try:
            start = time.perf_counter()
            extract_features(subset_paths, backbone, progress=False)
            cache_s_per_image = (time.perf_counter() - start) / len(subset)
            images, _, _ = build_image_store(subset_paths, backbone.image_size, progress=False)
            images = np.asarray(images)  # decoded uint8 in memory: the recompute side never decodes
        finally:
            if home is None:
                os.environ.pop("DEVISE_HOME", None)
            else:
                os.environ["DEVISE_HOME"] = home
    cache_time = cache_s_per_image * n_train
    print(f"feature cache: {cache_s_per_image * 1000:.1f} ms/image -> {cache_time:.1f} s for the training set")

    keras.utils.set_random_seed(0)
    backbone.features_model.trainable = False
    inputs = keras.Input(images.shape[1:], dtype="uint8")
    projection = linear_head(backbone.feature_dim, label_vectors.shape[1])(backbone.features_model(inputs))
    blog_model = keras.Model(inputs, projection)
    loss = HingeRankLoss(label_vectors, seed=0)
    blog_model.hinge_loss_seed = loss.seed_generator
    blog_model.compile(optimizer="adam", loss=loss)
    recompute_s = _epoch_seconds(blog_model, images, labels[subset], args.batch_size, max(1, args.epochs - 1))
    epoch_s_recompute = recompute_s / len(subset) * n_train
    print(f"recompute: {recompute_s:.2f} s/epoch for {len(subset)} images -> {epoch_s_recompute:.1f} s for {n_train}")

    result = {
        "epoch_s_cached": round(epoch_s_cached, 4),
        "epoch_s_recompute": round(epoch_s_recompute, 2),
        "cache_s": round(cache_time, 2),
        "train_images": int(n_train),
        "steps_per_s_cached": round(-(-n_train // args.batch_size) / epoch_s_cached, 1),
        "speedup_per_epoch": round(epoch_s_recompute / epoch_s_cached, 1),
        "speedup_10_epochs": round(10 * epoch_s_recompute / (cache_time + 10 * epoch_s_cached), 2),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
