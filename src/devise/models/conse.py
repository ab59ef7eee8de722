"""ConSE (Norouzi et al., ICLR 2014): zero-shot embedding by a convex combination of class vectors.

    f(x) = (1/Z) sum over the top T training classes c of p(c|x) s(c),   Z = sum of those p(c|x)

No projection is trained: any softmax model works, e.g. the backbone's ImageNet-1K classifier (the
class vectors are those of the ImageNet class names) or our phase-2 softmax model over the seen classes.
Predict by cosine between f(x) and the candidate label vectors.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from devise.assets import data_home, imagenet1k_classes
from devise.storage import cached_npz
from devise.errors import DeviseError
from devise.labels.vectors import LABEL_RULE_VERSION, embed_labels, load_vectors


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in numpy (float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def conse_embed(probabilities, class_vectors, T: int = 10) -> np.ndarray:
    """(N, C) class probabilities, (C, D) class vectors -> (N, D) unit-norm ConSE embeddings.

    Only the T most probable classes of each image contribute, weighted by their probabilities.
    Columns of `probabilities` may be a subset of a classifier's outputs (e.g. the ImageNet classes
    that have a word vector): the weights are renormalised by Z over the top T kept classes.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    class_vectors = np.asarray(class_vectors, dtype=np.float32)
    if probabilities.ndim != 2 or class_vectors.ndim != 2 or probabilities.shape[1] != class_vectors.shape[0]:
        raise DeviseError(f"ConSE: probabilities {probabilities.shape} do not match class vectors {class_vectors.shape}")
    if T < 1:
        raise DeviseError(f"ConSE: T must be at least 1, got {T}")
    T = min(int(T), probabilities.shape[1])
    top = np.argpartition(-probabilities, T - 1, axis=1)[:, :T]                 # (N, T) top-T classes
    weights = np.take_along_axis(probabilities, top, axis=1)                    # (N, T) p(c|x)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)   # 1/Z
    unit_vectors = class_vectors / np.maximum(np.linalg.norm(class_vectors, axis=1, keepdims=True), 1e-12)
    embedded = np.einsum("nt,ntd->nd", weights, unit_vectors[top])
    return embedded / np.maximum(np.linalg.norm(embedded, axis=1, keepdims=True), 1e-12)


def imagenet1k_class_vectors(vectors, wordnet=None):
    """Vectors of the backbone's 1000 ImageNet classes -> (kept class indices (K,), unit vectors (K, D), embedding).

    Labels are the ImageNet WordNet ids, so the vectors module's synset rule applies (the first lemma
    with a vector, as in the paper). Classes with no vector are dropped (and reported by the returned
    LabelEmbedding): ConSE then mixes only the classes it can place in the word space.
    """
    wnids = [c["wnid"] for c in imagenet1k_classes()]
    embedding = embed_labels(wnids, vectors, wordnet=wordnet, drop_missing=True)
    position = {wnid: i for i, wnid in enumerate(wnids)}
    kept = np.asarray([position[label] for label in embedding.labels], dtype=np.int64)
    return kept, np.asarray(embedding.matrix, dtype=np.float32), embedding


def cached_imagenet1k_class_vectors(vectors_spec: str) -> tuple[np.ndarray, np.ndarray]:
    """imagenet1k_class_vectors(load_vectors(vectors_spec))[:2], kept in the data home: a cold start then
    neither loads the word vectors nor looks up 1000 synsets (~1 s on 2 cores). Keyed like the
    vocabulary cache: the spec, and a vectors file's path, size and mtime."""
    key = f"v1|{LABEL_RULE_VERSION}|{vectors_spec}"
    if Path(vectors_spec).is_file():
        st = Path(vectors_spec).stat()
        key += f"|{Path(vectors_spec).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    path = data_home() / "vocab" / f"conse-imagenet1k-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"

    def compute() -> dict:
        kept, class_vectors, _ = imagenet1k_class_vectors(load_vectors(vectors_spec))
        return {"kept": kept, "class_vectors": class_vectors}

    def invalid(a: dict) -> str | None:
        if a["kept"].ndim != 1 or a["class_vectors"].shape[:1] != a["kept"].shape or a["class_vectors"].ndim != 2:
            return f"{a['kept'].shape} classes but class vectors of shape {a['class_vectors'].shape}"
        return None if np.isfinite(a["class_vectors"]).all() else "non-finite class vectors"

    cached = cached_npz(path, ("kept", "class_vectors"), compute, invalid)
    return cached["kept"], cached["class_vectors"]


def conse_from_logits(logits, class_vectors, kept=None, T: int = 10) -> np.ndarray:
    """ConSE embeddings from classifier logits (N, 1000): softmax over all classes, then keep `kept` columns."""
    probabilities = softmax(logits)
    if kept is not None:
        probabilities = probabilities[:, np.asarray(kept)]
    return conse_embed(probabilities, class_vectors, T)
