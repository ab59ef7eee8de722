"""ImageNet-1K top-k classification of image files with a pretrained backbone (`devise classify`)."""
from __future__ import annotations

import os
import warnings

import numpy as np

from devise import defaults
from devise.models.conse import softmax
from devise.errors import DeviseError
from devise.data.features import backbone_forward
from devise.data.images import load_images, scan_image_files
from devise.evaluation.metrics import top_k_indices
from devise.runtime import pad_batch

DECODE_CHUNK = 256  # images decoded at a time (150 KB each at 224 px)


def classify_arrays(images: np.ndarray, backbone=defaults.BACKBONE, top_k: int = 5,
                    batch_size: int = 32) -> list[list[dict]]:
    """uint8 (N, S, S, 3) images -> per image the top_k [{"label", "synset", "score"}] in rank order."""
    from devise.models.backbones import Backbone, load_backbone  # Keras: only when images are classified

    model = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
    forward = backbone_forward(model)
    if model.classifier is None:
        raise DeviseError(f"backbone '{model.name}' has no ImageNet classifier")
    if not 1 <= top_k <= 1000:
        raise DeviseError(f"top_k must be between 1 and 1000, not {top_k}")
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        probs = softmax(np.asarray(forward(pad_batch(chunk, batch_size))[1])[:len(chunk)])
        for row, top in zip(probs, top_k_indices(probs, top_k)):
            results.append([{"label": model.class_names[i], "synset": model.class_wnids[i], "score": float(row[i])}
                            for i in top])
    return results


def classify(paths: list[str | os.PathLike], backbone=defaults.BACKBONE, top_k: int = 5,
             batch_size: int = 32, weights: str | os.PathLike | None = None) -> list[dict]:
    """Classify image files (folders expand to the image files below them, as for `devise predict`):
    [{"image": path, "predictions": [{"label", "synset", "score"}, ...]}].

    score is the softmax probability; label is the clean ImageNet-1K name. Entries that are not readable
    files and images that fail to decode are left out and listed in one warning; none readable is a
    DeviseError naming them. backbone: a name or a Backbone; weights: passed to load_backbone with a name.
    """
    from devise.models.backbones import Backbone, load_backbone  # Keras: only when images are classified

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise DeviseError("no images given to classify")
    files, skipped = scan_image_files(paths)  # the one walker, as predict/index/datasets use
    if not files:
        raise DeviseError("no image files to classify in: " + ", ".join(str(p) for p in paths)
                          + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    model = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, weights)
    results, unreadable = [], []
    for start in range(0, len(files), DECODE_CHUNK):  # bounded memory for a big folder
        chunk = files[start:start + DECODE_CHUNK]
        images, valid = load_images(chunk, model.image_size, errors=unreadable)
        kept = [p for p, ok in zip(chunk, valid) if ok]
        if kept:
            # one batch shape for every chunk: one compiled forward
            predictions = classify_arrays(images[valid], model, top_k, batch_size=min(batch_size, len(files)))
            results += [{"image": p, "predictions": preds} for p, preds in zip(kept, predictions)]
    if not results:
        raise DeviseError("none of the images could be read: " + "; ".join(skipped + unreadable))
    if skipped or unreadable:
        warnings.warn(f"skipped {len(skipped) + len(unreadable)} unreadable image(s): "
                      + "; ".join(skipped + unreadable), stacklevel=2)
    return results

