"""Scoring and ranking labels: image embeddings against a vocabulary (devise.labels.vocabulary) or any label
matrix, with optional hubness correction; and top-k on the device for many queries.

`score_labels` is the cosine of every image to every term of a vocabulary; `rank_labels` takes each
image's top k and expands terms to their synsets (the paper's appendix A.2).

Hubness (a few labels nearest to every image) can be reduced with `hubness=`:
- "csls" (Conneau et al. 2018): score = 2 cos(x, l) - r_l, where r_l is the mean cosine of label l to
  its K=10 nearest images in a reference set (the image-side term is constant per image and dropped);
- "center": score = cos(x, l) - mean cosine of label l over the reference set.
The reference set is `reference=` (image embeddings; devise.serving.predict also takes a search index folder),
else the query images.

Against 100K+ labels a full sort of every score row is wasted work and memory: `top_k_labels` keeps
only the k best per query (keras.ops.top_k), processing queries in batches so memory stays bounded by
batch x labels, and never loops in Python over labels.
"""
from __future__ import annotations

import numpy as np

from devise.errors import DeviseError
from devise.evaluation.metrics import expand_to_synsets, top_k_indices
from devise.labels.vectors import unit_rows
from devise.labels.vocabulary import Vocabulary

HUBNESS = ("csls", "center")
CSLS_K = 10
MIN_REFERENCE = 20  # fewer reference images than this make the hubness statistics meaningless


def label_statistics(reference: np.ndarray, matrix: np.ndarray, k: int = CSLS_K,
                     chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per label: (mean cosine to its k nearest reference images, mean cosine over all of them)."""
    reference = unit_rows(reference)
    k = min(k, len(reference))
    knn_mean = np.empty(len(matrix), np.float32)
    mean = np.empty(len(matrix), np.float32)
    for lo in range(0, len(matrix), chunk):
        sims = reference @ matrix[lo:lo + chunk].T  # (M, chunk)
        mean[lo:lo + chunk] = sims.mean(axis=0)
        knn_mean[lo:lo + chunk] = np.partition(sims, len(reference) - k, axis=0)[len(reference) - k:].mean(axis=0)
    return knn_mean, mean


def score_labels(embeddings: np.ndarray, vocabulary: Vocabulary, hubness: str | None = None,
                 reference: np.ndarray | None = None) -> np.ndarray:
    """(N, D) unit image embeddings -> (N, T) term scores, hubness-corrected if asked.

    reference: the (M, D) image embeddings of the hubness statistics (default: the query images)."""
    if hubness not in (None, *HUBNESS):
        raise DeviseError(f"hubness must be one of {', '.join(HUBNESS)}, not '{hubness}'")
    if embeddings.shape[1] != vocabulary.matrix.shape[1]:
        raise DeviseError(f"embeddings are {embeddings.shape[1]}-d but vocabulary '{vocabulary.name}' is "
                          f"{vocabulary.matrix.shape[1]}-d (different word vectors)")
    scores = embeddings @ vocabulary.matrix.T
    if hubness is not None:
        reference = np.asarray(embeddings if reference is None else reference, np.float32)
        if len(reference) < MIN_REFERENCE:
            raise DeviseError(f"hubness correction needs at least {MIN_REFERENCE} reference images, got "
                              f"{len(reference)}: predict more images at once or pass a reference index")
        knn_mean, mean = label_statistics(reference, vocabulary.matrix)
        scores = 2 * scores - knn_mean if hubness == "csls" else scores - mean
    return scores


def rank_labels(scores: np.ndarray, vocabulary: Vocabulary, top_k: int,
                probabilities: np.ndarray | None = None) -> list[list[dict]]:
    """(N, T) term scores -> per image the top_k [{"label", "synset", "score"}] (appendix A.2 expansion);
    with (N, T) term `probabilities` (devise.evaluation.confidence), each also carries its "probability"."""
    if top_k < 1:
        raise DeviseError(f"top_k must be at least 1, not {top_k}")
    if vocabulary.one_per_term:
        entries = top_k_indices(scores, top_k)
    else:
        ranked = top_k_indices(scores, 4 * top_k)
        entries = expand_to_synsets(ranked, vocabulary.term_entries(), top_k)
    results = []
    for i, (row, picks) in enumerate(zip(scores, entries)):
        results.append([{"label": vocabulary.labels[e], "synset": vocabulary.synsets[e],
                         "score": round(float(row[vocabulary.entry_term[e]]), 6)} for e in picks if e >= 0])
        if probabilities is not None:
            for pred, e in zip(results[-1], [e for e in picks if e >= 0]):
                pred["probability"] = round(float(probabilities[i, vocabulary.entry_term[e]]), 6)
    return results


# ---------------------------------------------------------------- top-k on the device

def top_k_labels(queries: np.ndarray, label_vectors: np.ndarray, k: int, *, batch_size: int = 1024,
                 normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N,k), scores (N,k)) of the k labels with the highest cosine (or dot) score per query.

    Ties go to the lower label index. k larger than the number of labels is clipped to it.
    """
    from keras import ops  # Keras only where the device does the work (`import devise.evaluation.ranking` stays light)

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
