"""Ranking labels for many queries: scores computed and top-k taken on the device, in batches.

Against 100K+ labels a full sort of every score row is wasted work and memory: `top_k_labels` keeps
only the k best per query (keras.ops.top_k), processing queries in batches so memory stays bounded by
batch x labels, and never loops in Python over labels.
"""
from __future__ import annotations

import numpy as np
from keras import ops

from devise.vectors import unit_rows


def top_k_labels(queries: np.ndarray, label_vectors: np.ndarray, k: int, *, batch_size: int = 1024,
                 normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N,k), scores (N,k)) of the k labels with the highest cosine (or dot) score per query.

    Ties go to the lower label index. k larger than the number of labels is clipped to it.
    """
    queries = np.asarray(queries, np.float32)
    labels = np.asarray(label_vectors, np.float32)
    if normalize:
        queries, labels = unit_rows(queries), unit_rows(labels)
    k = min(k, len(labels))
    labels_t = ops.convert_to_tensor(labels.T)  # (D, L) stays on the device for every batch
    indices, scores = [], []
    for start in range(0, len(queries), batch_size):
        block = ops.matmul(ops.convert_to_tensor(queries[start:start + batch_size]), labels_t)
        values, idx = ops.top_k(block, k, sorted=True)
        indices.append(idx)
        scores.append(values)
    if not indices:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return (np.concatenate([np.asarray(i) for i in indices]).astype(np.int64),
            np.concatenate([np.asarray(s) for s in scores]))


def full_sort_labels(queries: np.ndarray, label_vectors: np.ndarray, k: int, *, batch_size: int = 1024,
                     normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The naive way (score everything, argsort every row, keep k): the baseline of benchmarks/ranking.py."""
    queries = np.asarray(queries, np.float32)
    labels = np.asarray(label_vectors, np.float32)
    if normalize:
        queries, labels = unit_rows(queries), unit_rows(labels)
    labels_t = ops.convert_to_tensor(labels.T)
    indices, scores = [], []
    for start in range(0, len(queries), batch_size):
        block = ops.matmul(ops.convert_to_tensor(queries[start:start + batch_size]), labels_t)
        order = ops.argsort(-block, axis=-1)[:, :k]
        indices.append(np.asarray(order))
        scores.append(np.asarray(ops.take_along_axis(block, order, axis=-1)))
    return np.concatenate(indices).astype(np.int64), np.concatenate(scores)
