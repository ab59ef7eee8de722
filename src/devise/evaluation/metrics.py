"""The paper's metrics (flat hit@k, hierarchical precision@k, synset expansion) and today's ZSL ones.

Everything is vectorised with numpy and chunked over images, so 50K images x 20K labels never loops in
Python per label or per image (the hop searches of hp@k loop once per DISTINCT true label).

Conventions: `scores` is float (N, L), higher is better; labels are integer indices into the label set
being evaluated; a top-k matrix is int (N, >=k), best first, -1 meaning "no prediction" (it never hits).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from devise.errors import DeviseError
from devise.labels.wordnet import load_wordnet

_CHUNK_ELEMENTS = 1 << 22  # scores processed per chunk (4M floats): bounds memory on 50K x 20K


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _scores_2d(scores) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise DeviseError(f"scores: expected a 2-D (images, labels) array, got shape {scores.shape}")
    return scores


# ------------------------------------------------------------------ top-k

def top_k_indices(scores, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first: int (N, min(k, L)).

    Ties are broken deterministically by the lower label index, both for which tied labels make the cut
    and for their order. NaN scores rank last. Uses a partition (O(L) per row) rather than a full sort.
    """
    scores = _scores_2d(scores)
    n, n_labels = scores.shape
    k = min(int(k), n_labels)
    if k <= 0:
        raise DeviseError(f"k={k}: must be at least 1")
    out = np.empty((n, k), np.int64)
    for rows in _row_chunks(n, n_labels):
        s = scores[rows]
        if not np.issubdtype(s.dtype, np.floating):
            s = s.astype(np.float64)
        nan = np.isnan(s)
        if nan.any():
            s = np.where(nan, -np.inf, s)
        kth = np.partition(s, n_labels - k, axis=1)[:, n_labels - k][:, None]  # k-th largest per row
        above = s > kth
        tied = s == kth
        need = k - above.sum(axis=1, keepdims=True)
        chosen = above | tied
        # rows with more tied labels than places left: the lowest-index tied labels fill them
        crowded = np.flatnonzero(tied.sum(axis=1) > need[:, 0])
        if len(crowded):
            chosen[crowded] = above[crowded] | (tied[crowded] & (np.cumsum(tied[crowded], axis=1) <= need[crowded]))
        idx = np.nonzero(chosen)[1].reshape(-1, k)  # row-major: ascending index within each row
        vals = np.take_along_axis(s, idx, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")  # stable keeps the lower index first on ties
        out[rows] = np.take_along_axis(idx, order, axis=1)
    return out


def _as_topk(scores_or_topk, k: int) -> np.ndarray:
    """A top-k matrix: integer input is taken as top-k label indices, float input as scores."""
    a = np.asarray(scores_or_topk)
    if a.ndim != 2:
        raise DeviseError(f"predictions: expected a 2-D array, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        if a.shape[1] < k:
            raise DeviseError(f"top-k predictions have {a.shape[1]} columns, fewer than k={k}")
        return a
    return top_k_indices(a, k)


def _labels_1d(true_labels, n: int) -> np.ndarray:
    t = np.asarray(true_labels).astype(np.int64).reshape(-1)
    if len(t) != n:
        raise DeviseError(f"true labels: {len(t)} given for {n} images")
    return t


def flat_hit_at_k(scores_or_topk, true_labels, ks: Iterable[int] = (1, 2, 5, 10)) -> dict[int, float]:
    """{k: fraction of images whose true label is among the top k}. Integer input = top-k indices.

    When the label set has fewer than k labels every label is predicted and hit@k is 1.
    """
    ks = sorted(set(int(k) for k in ks))
    topk = _as_topk(scores_or_topk, max(ks))
    true = _labels_1d(true_labels, len(topk))
    hit_rank = np.where(topk == true[:, None], np.arange(topk.shape[1]), topk.shape[1] + max(ks)).min(axis=1)
    return {k: float(np.mean(hit_rank < k)) if len(true) else float("nan") for k in ks}


# ------------------------------------------------------------------ hierarchical precision (appendix A.3)

def _csr_positions(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges starts[i] .. starts[i] + counts[i] - 1, without a Python loop."""
    total = int(counts.sum())
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(total)


def _hcorrect_pairs(sources: np.ndarray, label_wnids: Sequence[str | None], ks: Sequence[int], wordnet,
                    instances: bool = True, progress: bool | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """hCorrectSet of every source label, per k, as parallel arrays (source position, label index).

    For each source (true) label: R = 0, 1, 2, ...; the labels whose synset lies exactly R hops from the
    true label's synset (undirected hypernym/hyponym graph) are added, until the set holds >= k labels.
    The search also stops when every label with a synset has been reached or no new synset is reachable,
    so the set may stay smaller than k (k larger than the label set). A label without a synset has
    hCorrectSet = {itself} (and is never reached from another label).
    """
    ks = sorted(set(int(k) for k in ks))
    kmax = ks[-1]
    n_nodes = len(wordnet)
    label_node = np.array([wordnet.index.get(w, -1) if w is not None else -1 for w in label_wnids], np.int64)
    unknown = [w for w, n in zip(label_wnids, label_node) if w is not None and n < 0]
    if unknown:
        raise DeviseError(f"label synset {unknown[0]!r}: not in WordNet ({len(unknown)} such labels)")
    has_node = label_node >= 0
    # labels per graph node in CSR form (several labels may share one synset)
    order = np.argsort(label_node[has_node], kind="stable")
    node_labels = np.flatnonzero(has_node)[order]
    node_counts = np.bincount(label_node[has_node], minlength=n_nodes)
    node_start = np.concatenate([[0], np.cumsum(node_counts)])
    n_reachable = int(has_node.sum())

    src_parts = {k: [] for k in ks}
    lab_parts = {k: [] for k in ks}
    seen = np.zeros(n_nodes, bool)
    if progress is None:
        progress = len(sources) >= 2000
    for pos, t in enumerate(tqdm(sources, desc="hCorrectSet", disable=not progress, leave=False)):
        start = label_node[t]
        if start < 0:
            for k in ks:
                src_parts[k].append(np.array([pos]))
                lab_parts[k].append(np.array([t]))
            continue
        rings = [np.array([start])]  # synsets at exactly R hops, R = 0, 1, ...
        counts = [int(node_counts[start])]
        seen[start] = True
        total, frontier = counts[0], rings[0]
        while total < kmax and total < n_reachable and len(frontier):
            nxt = np.unique(wordnet.neighbours_of(frontier, instances))
            nxt = nxt[~seen[nxt]]
            seen[nxt] = True
            frontier = nxt
            rings.append(nxt)
            counts.append(int(node_counts[nxt].sum()))
            total += counts[-1]
        touched = np.concatenate(rings)
        seen[touched] = False
        cumulative = np.cumsum(counts)
        for k in ks:
            radius = min(int(np.searchsorted(cumulative, k)), len(rings) - 1)  # first R with size >= k
            nodes = np.concatenate(rings[:radius + 1])
            nodes = nodes[node_counts[nodes] > 0]
            labs = node_labels[_csr_positions(node_start[nodes], node_counts[nodes])]
            src_parts[k].append(np.full(len(labs), pos))
            lab_parts[k].append(labs)
    return {k: (np.concatenate(src_parts[k]).astype(np.int64), np.concatenate(lab_parts[k]).astype(np.int64))
            for k in ks}


def hcorrect_sets(true_labels: Iterable[int], label_wnids: Sequence[str | None], ks: Iterable[int], wordnet,
                  instances: bool = True) -> dict[int, dict[int, np.ndarray]]:
    """{k: {true label: sorted label indices of its hCorrectSet}} (appendix A.3), one per distinct label."""
    sources = np.unique(np.asarray(list(true_labels), np.int64))
    pairs = _hcorrect_pairs(sources, label_wnids, list(ks), wordnet, instances)
    out = {}
    for k, (src, lab) in pairs.items():
        out[k] = {int(sources[p]): np.sort(lab[src == p]) for p in range(len(sources))}
    return out


def hcorrect_set_sizes(label_wnids: Sequence[str | None], ks: Iterable[int] = (2, 5, 10, 20), wordnet=None,
                       instances: bool = True) -> dict[int, float]:
    """{k: mean |hCorrectSet|} over the labels that have a synset, each taken as the true label.

    The paper's Table-5 check: 6.5 / 12.5 / 22.5 / 41.7 at k = 2 / 5 / 10 / 20 on ImageNet-1K.
    """
    if wordnet is None:
        wordnet = load_wordnet()
    sources = np.array([i for i, w in enumerate(label_wnids) if w is not None], np.int64)
    if len(sources) == 0:
        raise DeviseError("hcorrect_set_sizes: no label has a synset")
    pairs = _hcorrect_pairs(sources, label_wnids, list(ks), wordnet, instances)
    return {k: len(src) / len(sources) for k, (src, _) in pairs.items()}


def hierarchical_precision_at_k(scores_or_topk, true_labels, label_wnids: Sequence[str | None], wordnet=None,
                                ks: Iterable[int] = (2, 5, 10, 20), instances: bool = True,
                                return_sizes: bool = False):
    """{k: hp@k} exactly as appendix A.3: mean over images of |top-k ∩ hCorrectSet(true label)| / k.

    label_wnids[i] is the synset of label i (None: no synset; such a label's hCorrectSet is itself only,
    so evaluate hp@k on images whose true label has a synset, as the paper's label sets all do).
    hCorrectSet grows by hop radius on the undirected WordNet graph (see `_hcorrect_pairs`), keeping only
    labels of this label set; it is computed once per distinct true label. With return_sizes=True the
    result is (hp, {k: mean |hCorrectSet| over the images}).
    """
    if wordnet is None:
        wordnet = load_wordnet()
    ks = sorted(set(int(k) for k in ks))
    topk = _as_topk(scores_or_topk, ks[-1])
    true = _labels_1d(true_labels, len(topk))
    n_labels = len(label_wnids)
    if len(true) and (true.min() < 0 or true.max() >= n_labels):
        raise DeviseError(f"true labels must lie in 0..{n_labels - 1} (the label set of {n_labels} synsets)")
    sources, image_source = np.unique(true, return_inverse=True)
    pairs = _hcorrect_pairs(sources, label_wnids, ks, wordnet, instances)
    hp, sizes = {}, {}
    for k in ks:
        src, lab = pairs[k]
        correct_keys = np.unique(src * n_labels + lab)
        pred = topk[:, :k]
        keys = image_source[:, None] * n_labels + pred
        where = np.clip(np.searchsorted(correct_keys, keys), 0, max(0, len(correct_keys) - 1))
        hit = (correct_keys[where] == keys) & (pred >= 0)
        hp[k] = float(hit.sum(axis=1).mean() / k) if len(true) else float("nan")
        sizes[k] = float(np.bincount(src, minlength=len(sources))[image_source].mean()) if len(true) else float("nan")
    return (hp, sizes) if return_sizes else hp


# ------------------------------------------------------------------ per-class and generalized zero-shot

def per_class_top1(pred, true) -> float:
    """Mean over the classes present in `true` of (images of the class predicted right / its images)."""
    pred = np.asarray(pred).astype(np.int64).reshape(-1)
    true = _labels_1d(true, len(pred))
    if len(true) == 0:
        return float("nan")
    if true.min() < 0:
        raise DeviseError("true labels must be non-negative label indices")
    totals = np.bincount(true)
    correct = np.bincount(true[pred == true], minlength=len(totals))
    present = totals > 0
    return float(np.mean(correct[present] / totals[present]))


def _best_seen_unseen(scores, seen_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: (best seen score, its label, best unseen score, its label); -inf / -1 when none."""
    scores = _scores_2d(scores)
    seen_mask = np.asarray(seen_mask, bool).reshape(-1)
    if len(seen_mask) != scores.shape[1]:
        raise DeviseError(f"seen mask has {len(seen_mask)} entries for {scores.shape[1]} labels")
    n = len(scores)
    out = [np.full(n, -np.inf), np.full(n, -1, np.int64), np.full(n, -np.inf), np.full(n, -1, np.int64)]
    for mask, (vi, ii) in ((seen_mask, (0, 1)), (~seen_mask, (2, 3))):
        cols = np.flatnonzero(mask)
        if len(cols) == 0:
            continue
        for rows in _row_chunks(n, len(cols)):
            s = scores[rows][:, cols].astype(np.float64)
            s[np.isnan(s)] = -np.inf
            best = s.argmax(axis=1)  # first maximum = lowest label index on ties
            out[vi][rows] = s[np.arange(len(best)), best]
            out[ii][rows] = cols[best]
    return tuple(out)


def _gzsl_from_best(best, true, is_unseen_image, gamma: float) -> dict[str, float]:
    seen_val, seen_idx, unseen_val, unseen_idx = best
    adjusted = seen_val - gamma
    # argmax over (scores - gamma * seen): the larger wins, a tie goes to the lower label index
    take_seen = (adjusted > unseen_val) | ((adjusted == unseen_val) & (seen_idx < unseen_idx) & (seen_idx >= 0))
    pred = np.where(take_seen, seen_idx, unseen_idx)
    u = per_class_top1(pred[is_unseen_image], true[is_unseen_image])
    s = per_class_top1(pred[~is_unseen_image], true[~is_unseen_image])
    h = 2 * u * s / (u + s) if u + s > 0 else 0.0
    return {"u": u, "s": s, "H": float(h)}


def _gzsl_inputs(scores, true, is_unseen_image):
    scores = _scores_2d(scores)
    true = _labels_1d(true, len(scores))
    unseen = np.asarray(is_unseen_image, bool).reshape(-1)
    if len(unseen) != len(true):
        raise DeviseError(f"is_unseen_image has {len(unseen)} entries for {len(true)} images")
    if unseen.all() or not unseen.any():
        raise DeviseError("generalized zero-shot needs test images of both seen and unseen classes")
    return scores, true, unseen


def generalized_zero_shot(scores, true, seen_mask_over_labels, is_unseen_image, gamma: float = 0.0) -> dict[str, float]:
    """Xian et al.'s GZSL: {"u", "s", "H"} with the search over ALL labels.

    u / s = per-class mean top-1 on images of unseen / seen classes; H = 2us / (u + s).
    Calibrated stacking (Chao et al.): `gamma` is subtracted from every seen label's score first;
    choose it with `choose_calibration` on validation data, never on the test images.
    """
    scores, true, unseen = _gzsl_inputs(scores, true, is_unseen_image)
    return _gzsl_from_best(_best_seen_unseen(scores, seen_mask_over_labels), true, unseen, float(gamma))


def choose_calibration(scores_val, true_val, seen_mask, is_unseen_val, gammas: Sequence[float] | None = None) -> float:
    """The calibrated-stacking constant that maximises H on VALIDATION images.

    Default grid: 0 plus up to 400 points spread over the range of the per-image margins (best seen score
    minus best unseen score), taken between consecutive quantiles, so it covers the score range where the
    decision can change. Ties in H go to the gamma closest to 0.
    """
    scores, true, unseen = _gzsl_inputs(scores_val, true_val, is_unseen_val)
    best = _best_seen_unseen(scores, seen_mask)
    if gammas is None:
        margins = best[0] - best[2]
        margins = np.unique(margins[np.isfinite(margins)])
        if len(margins) > 401:
            margins = np.quantile(margins, np.linspace(0, 1, 401))
        # between consecutive margins H is constant: try the midpoints and just outside both ends
        mids = (margins[1:] + margins[:-1]) / 2 if len(margins) > 1 else margins
        ends = [margins[0] - 1e-6, margins[-1] + 1e-6] if len(margins) else []
        gammas = np.concatenate([[0.0], mids, ends])
    gammas = np.asarray(sorted(set(float(g) for g in gammas), key=abs))
    h = [_gzsl_from_best(best, true, unseen, g)["H"] for g in gammas]
    return float(gammas[int(np.argmax(h))])  # argmax takes the first, i.e. the smallest |gamma|


# ------------------------------------------------------------------ synset expansion (appendix A.2)

def expand_to_synsets(ranked_terms, term_to_synsets: Sequence[Sequence[int]], k: int) -> np.ndarray:
    """Appendix A.2: from terms ranked nearest first, the top k synsets, int (N, k), -1 padded.

    ranked_terms: int (N, >=4k) term indices, best first (e.g. `top_k_indices(term_scores, 4 * k)`);
    term_to_synsets[t]: the synset label indices containing term t (see `term_synset_lists`).
    The 4k nearest terms are each expanded to all their synsets, duplicates dropped keeping the first,
    and the first k kept (fewer than k synsets found: the row ends in -1).
    """
    ranked = np.asarray(ranked_terms, np.int64)
    if ranked.ndim != 2:
        raise DeviseError(f"ranked terms: expected a 2-D array, got shape {ranked.shape}")
    ranked = ranked[:, :4 * k]
    counts = np.array([len(s) for s in term_to_synsets], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    flat = np.array([int(x) for s in term_to_synsets for x in s], np.int64)
    n_syn = int(flat.max()) + 1 if len(flat) else 1
    out = np.full((len(ranked), k), -1, np.int64)
    for rows in _row_chunks(len(ranked), 64 * ranked.shape[1]):
        r = ranked[rows]
        valid = r >= 0
        terms = np.where(valid, r, 0)
        c = np.where(valid, counts[terms], 0).reshape(-1)
        row_of = np.repeat(np.arange(len(r)), r.shape[1])
        term_start = starts[terms].reshape(-1)
        total = int(c.sum())
        if total == 0:
            continue
        # every (row, synset) in rank order: term order first, then the term's own synset order
        pos = _csr_positions(term_start, c)
        syn, row = flat[pos], np.repeat(row_of, c)
        _, first = np.unique(row * n_syn + syn, return_index=True)
        first.sort()  # first occurrences, back in rank order
        syn, row = syn[first], row[first]
        rank_in_row = np.arange(len(row)) - np.searchsorted(row, row)  # row is sorted: rank within it
        keep = rank_in_row < k
        out[rows][row[keep], rank_in_row[keep]] = syn[keep]
    return out


def term_synset_lists(terms: Sequence[str], synset_ids: Sequence[str], wordnet) -> list[list[int]]:
    """For each term, the indices into `synset_ids` of the synsets containing it (WordNet sense order)."""
    where = {w: i for i, w in enumerate(synset_ids)}
    return [[where[w] for w in wordnet.synsets_for(t) if w in where] for t in terms]


# ------------------------------------------------------------------ confidence: known vs unknown, selective, ECE

def auroc(known, unknown) -> float:
    """Area under the ROC curve of a confidence score telling `known` cases (positives, should score high)
    from `unknown` ones: the chance a random known case outscores a random unknown one, ties counting 1/2."""
    known, unknown = np.asarray(known, np.float64).ravel(), np.asarray(unknown, np.float64).ravel()
    if len(known) == 0 or len(unknown) == 0:
        raise DeviseError("AUROC needs both known and unknown cases")
    values = np.concatenate([known, unknown])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts  # average rank within each group of ties
    ranks = (start + (counts + 1) / 2)[inverse]
    return float((ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))


def fpr_at_tpr(known, unknown, tpr: float = 0.95) -> float:
    """The fraction of unknown cases accepted at the threshold that accepts `tpr` of the known ones
    (FPR@95%TPR): the threshold is the known scores' (1 - tpr) quantile, accepting scores >= it."""
    known, unknown = np.asarray(known, np.float64).ravel(), np.asarray(unknown, np.float64).ravel()
    if len(known) == 0 or len(unknown) == 0:
        raise DeviseError("FPR at TPR needs both known and unknown cases")
    threshold = np.sort(known)[::-1][max(0, int(np.ceil(tpr * len(known))) - 1)]
    return float(np.mean(unknown >= threshold))


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """Selective prediction (Geifman et al.): answers kept from the most confident down; per number kept
    (1..N) the coverage (fraction kept) and the risk (error rate among those kept)."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, bool).ravel()
    if len(confidence) != len(correct) or len(correct) == 0:
        raise DeviseError(f"risk-coverage needs one correctness per confidence ({len(confidence)} vs {len(correct)})")
    order = np.argsort(-confidence, kind="mergesort")
    kept = np.arange(1, len(correct) + 1)
    return kept / len(correct), np.cumsum(~correct[order]) / kept


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve (the mean of the risks at every coverage): lower is better."""
    return float(risk_coverage(confidence, correct)[1].mean())


def expected_calibration_error(confidence, correct, bins: int = 15) -> float:
    """ECE: over `bins` equal-width confidence bins, the |accuracy - mean confidence| weighted by the
    fraction of answers in the bin (Guo et al. 2017). confidence in [0, 1], one per answer."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, np.float64).ravel()
    if len(confidence) != len(correct) or len(correct) == 0:
        raise DeviseError(f"ECE needs one correctness per confidence ({len(confidence)} vs {len(correct)})")
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / len(correct)) if count.any() else 0.0
