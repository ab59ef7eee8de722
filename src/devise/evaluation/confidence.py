"""Calibrated probabilities and an "unknown" answer for open-vocabulary predictions.

A cosine alone cannot be thresholded: a photo of something outside the vocabulary still gets a cosine
like the right answer's. The probability of label i among the labels asked about (MCM, Ming et al. 2022,
with a background vocabulary as in NegLabel, Jiang et al. 2024):

    p_i = exp(s_i / T) / (sum_j exp(s_j / T) + sum_b exp(n_b / T))

s: the image's cosines to the asked labels; n: its cosines to a BACKGROUND of WordNet nouns far from the
asked labels (the farthest `background` of a seeded sample of WordNet noun synsets, near-duplicates of an
asked label never among them). The background is where the mass goes when none of the asked labels fits:
a softmax over 3 labels alone never falls below 1/3, so a photo asked against 3 wrong labels could never
be "unknown". The labels' probabilities sum to 1 - P(background) ("none of these").

T is fit by NLL on validation data (`fit_confidence`); the default threshold `min_confidence` keeps
KEEP_KNOWN of validation images whose class is in the vocabulary. A run stores both in settings.json
("confidence"); presets carry a fit on the benchmark's validation split (presets.PRESETS).

Labels the model was trained on (its class names) get their own temperature, `seen_temperature`, where
one was fit (`fit_seen_temperature`: held-out images of the training classes against them, the
background's temperature held at T): a trained model's cosines to its own classes are sharper than to
new labels, and one T fit on new labels leaves them underconfident (emoji benchmark, seen-class ECE of
the trained heads .18 / .32 with T, .10 / .14 with their own, .04 / .07 once the benchmark corrects it for
its harder calibration style, benchmark.SEEN_TEMPERATURE_TRANSFER; README "Confidence"). Without one,
every label uses T.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from devise.storage import atomic_write_json
from devise.errors import DeviseError
from devise.evaluation.ranking import rank_labels, score_labels
from devise.labels.vectors import embed_labels, load_vectors, quiet_dropped_labels
from devise.labels.wordnet import load_wordnet

KEEP_KNOWN = 0.95  # the default threshold keeps this fraction of in-vocabulary validation images
# Background labels added to the softmax (0: plain MCM). Chosen on the emoji benchmark's validation classes
# (seed 0, stage-1 models, benchmarks/confidence.py): with 0, 100, 300, 1000, 3000 the 5-head DeViSE's
# 3-label vocabularies kept / called unknown 100/0, 72/73, 62/81, 57/86, 51/88 % of known / all-wrong ones
# at the 95%-keep threshold, validation ECE .036 .035 .048 .058 .085: 100 (the hinge MLP agreed).
BACKGROUND = 100
BACKGROUND_POOL = 4000  # WordNet noun synsets sampled (seeded) as candidates
DUPLICATE_COSINE = 0.9  # a candidate this close to an asked label is that label, never background
TEMPERATURES = np.geomspace(0.002, 1.0, 121)  # the NLL grid (log-spaced)
MIN_FIT_IMAGES, MIN_FIT_CLASSES = 30, 5  # less validation data than this: no threshold is fit


@dataclass(frozen=True)
class Confidence:
    """How a model turns cosines into probabilities: its temperature, its default "unknown" threshold,
    the background size, and the data they were fit on (for the record)."""

    temperature: float = 0.05  # about what runs on the emoji benchmark fit (0.04-0.07)
    min_confidence: float = 0.0  # unfit: always answer
    background: int = BACKGROUND
    fit_on: str = "not fit (defaults)"
    seen_temperature: float | None = None  # for the model's own training classes (None: `temperature`)
    seen_fit_on: str = ""

    def label_temperatures(self, labels, seen_names) -> float | np.ndarray:
        """The temperature of each label: seen_temperature for the model's training classes (by name),
        `temperature` for every other; a scalar when all share one."""
        if self.seen_temperature is None or labels is None or not seen_names:
            return self.temperature
        names = set(seen_names)
        seen = np.fromiter((label in names for label in labels), bool, len(labels))
        if not seen.any():
            return self.temperature
        return np.where(seen, self.seen_temperature, self.temperature)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Confidence":
        return cls(**{k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------- the background vocabulary

@lru_cache(maxsize=4)
def _pool_texts(size: int = BACKGROUND_POOL, seed: int = 0) -> tuple[list[str], list[str]]:
    wordnet = load_wordnet()
    ids = sorted(wordnet.all_noun_ids())
    picks = np.random.default_rng(seed).choice(len(ids), min(size, len(ids)), replace=False)
    chosen = [ids[i] for i in sorted(picks)]
    return [wordnet.name(w).replace("_", " ") for w in chosen], chosen


_pools: dict[str, np.ndarray] = {}


def background_pool(vectors_spec: str) -> np.ndarray:
    """(P, D) unit vectors of the candidate background labels in a label space (computed once per space)."""
    if vectors_spec not in _pools:
        names, _ = _pool_texts()
        with quiet_dropped_labels():
            _pools[vectors_spec] = np.asarray(embed_labels(names, load_vectors(vectors_spec), drop_missing=True).matrix,
                                              np.float32)
    return _pools[vectors_spec]


def select_background(pool: np.ndarray, label_matrix: np.ndarray, size: int = BACKGROUND) -> np.ndarray:
    """The `size` pool vectors farthest from the asked labels (lowest largest cosine to any of them);
    a candidate within DUPLICATE_COSINE of an asked label is never chosen. (B, D), B <= size."""
    if size <= 0 or len(pool) == 0 or len(label_matrix) == 0:
        return np.zeros((0, pool.shape[1] if pool.ndim == 2 else 0), np.float32)
    nearest = np.full(len(pool), -np.inf, np.float32)
    for lo in range(0, len(label_matrix), 8192):  # bounded memory for 80K-label vocabularies
        nearest = np.maximum(nearest, (pool @ label_matrix[lo:lo + 8192].T).max(axis=1))
    candidates = np.flatnonzero(nearest < DUPLICATE_COSINE)
    keep = candidates[np.argsort(nearest[candidates], kind="stable")[:size]]
    return pool[np.sort(keep)]


IMAGE_OFFSET_K = 10  # nearest candidate nouns averaged into an image's offset


def image_offset(embeddings: np.ndarray, pool: np.ndarray, k: int = IMAGE_OFFSET_K) -> np.ndarray:
    """(N,) each image's mean cosine to its k nearest background candidates (WordNet nouns): how close
    the image lies to words in general. The top-1 cosine minus it (the image side of CSLS, Conneau et
    al. 2018, against a fixed vocabulary) tells known from unknown better than the cosine or the
    probability on the emoji benchmark's validation classes (benchmarks/confidence.py SCORES=1)."""
    sims = np.asarray(embeddings, np.float32) @ np.asarray(pool, np.float32).T
    k = min(k, sims.shape[1])
    return np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


# ---------------------------------------------------------------- probabilities

def _log_normaliser(logits: np.ndarray, background_scores: np.ndarray | None, background_temperature) -> np.ndarray:
    if background_scores is not None and background_scores.shape[1]:
        logits = np.concatenate([logits, background_scores / background_temperature], axis=1)
    top = logits.max(axis=1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def probabilities(scores, temperature, background_scores=None, background_temperature: float | None = None) -> np.ndarray:
    """(N, L) cosines (and (N, B) cosines to the background) -> (N, L) probabilities of the labels.
    temperature: one, or one per label (Confidence.label_temperatures); the background's is
    `background_temperature` (default: the scalar temperature)."""
    scores = np.asarray(scores, np.float64)
    temperature = np.asarray(temperature, np.float64)
    if (temperature <= 0).any():
        raise DeviseError(f"temperature must be positive, not {temperature.min()}")
    if background_temperature is None:
        if temperature.ndim and background_scores is not None:
            raise DeviseError("per-label temperatures need the background's temperature")
        background_temperature = float(temperature.max())
    background = None if background_scores is None else np.asarray(background_scores, np.float64)
    logits = scores / temperature
    return np.exp(logits - _log_normaliser(logits, background, background_temperature))


def label_probabilities(model, embeddings: np.ndarray, scores: np.ndarray, label_matrix: np.ndarray,
                        background=None, labels=None) -> np.ndarray:
    """(N, L) probabilities of a model's images over the asked labels, with the model's confidence
    settings. background: its (B, D) vectors when already selected for this vocabulary (a server keeps
    them); else they are selected here (one (P, L) product). labels: the asked labels' names (those
    that are the model's training classes take its seen_temperature)."""
    conf = model.confidence
    if background is None:
        background = select_background(background_pool(model.vectors_spec), label_matrix, conf.background) \
            if conf.background else None
    extra = None if background is None else np.asarray(embeddings, np.float32) @ background.T
    return probabilities(scores, conf.label_temperatures(labels, getattr(model, "class_names", None)), extra,
                         conf.temperature)


def rank_with_probabilities(model, embeddings: np.ndarray, vocabulary, top_k: int, hubness: str | None = None,
                            reference=None, background=None) -> list[list[dict]]:
    """Per image its top_k [{"label", "synset", "score", "probability"}] among a devise.labels.vocabulary
    Vocabulary: ranked by cosine (or the hubness-corrected score against `reference` embeddings), the
    probability from the raw cosines."""
    scores = score_labels(embeddings, vocabulary, hubness, reference)
    cosines = embeddings @ vocabulary.matrix.T if hubness else scores
    return rank_labels(scores, vocabulary, top_k, label_probabilities(model, embeddings, cosines, vocabulary.matrix,
                                                                      background, vocabulary.labels))


# ---------------------------------------------------------------- fitting on validation data

def nll(scores, true, temperature: float, background_scores=None, background_temperature: float | None = None) -> float:
    """Mean negative log-likelihood of the true labels (the background at `background_temperature`,
    default the same temperature)."""
    scores = np.asarray(scores, np.float64)
    background = None if background_scores is None else np.asarray(background_scores, np.float64)
    logits = scores / temperature
    logp = logits[np.arange(len(true)), true] - _log_normaliser(logits, background,
                                                                background_temperature or temperature)[:, 0]
    return float(-logp.mean())


def fit_temperature(scores, true, background_scores=None, background_temperature: float | None = None) -> float:
    """The temperature minimising the NLL of the true labels (validation images against validation
    classes): a log-spaced grid, then a finer one around its best point. background_temperature: the
    background's, held fixed (fitting a seen-class temperature); default: the fitted one."""
    true = np.asarray(true, np.int64)
    if len(true) == 0:
        raise DeviseError("fitting a temperature needs validation images")
    loss = lambda t: nll(scores, true, t, background_scores, background_temperature)  # noqa: E731
    grid = TEMPERATURES
    for _ in range(2):
        best = int(np.argmin([loss(t) for t in grid]))
        grid = np.geomspace(grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], 21)
    return float(grid[int(np.argmin([loss(t) for t in grid]))])


def choose_threshold(top_probability_known, keep: float = KEEP_KNOWN) -> float:
    """The largest threshold that still answers (does not call "unknown") `keep` of the images whose
    class is in the vocabulary: the (1 - keep) quantile of their top-1 probabilities."""
    values = np.sort(np.asarray(top_probability_known, np.float64))
    if len(values) == 0:
        raise DeviseError("choosing a threshold needs validation images")
    return float(values[int(np.floor((1 - keep) * len(values)))])


def fit_confidence(scores, true, embeddings=None, pool=None, label_matrix=None, background: int | None = None,
                   fit_on: str = "", keep: float = KEEP_KNOWN) -> Confidence:
    """Temperature and default threshold from validation images: `scores` (N, L) cosines against the
    validation vocabulary (true: the column of each image's class). With `background` > 0, also the
    images' `embeddings`, the candidate `pool` and the vocabulary's `label_matrix` (its background)."""
    background = BACKGROUND if background is None else background
    extra = None
    if background:
        extra = np.asarray(embeddings, np.float32) @ select_background(pool, label_matrix, background).T
    temperature = fit_temperature(scores, true, extra)
    top = probabilities(scores, temperature, extra).max(axis=1)
    return Confidence(temperature=round(temperature, 6), min_confidence=round(choose_threshold(top, keep), 6),
                      background=int(background), fit_on=fit_on)


def fit_seen_temperature(conf: Confidence, scores, true, embeddings=None, pool=None, label_matrix=None,
                         fit_on: str = "") -> Confidence:
    """`conf` with the seen-class temperature: fit by NLL on held-out images of the model's training
    classes (`scores` (N, L) cosines against them, true: each image's column), the background (selected
    as for any vocabulary) held at conf.temperature. The threshold stays conf's."""
    extra = None
    if conf.background:
        extra = np.asarray(embeddings, np.float32) @ select_background(pool, label_matrix, conf.background).T
    seen = fit_temperature(scores, true, extra, conf.temperature)
    return replace(conf, seen_temperature=round(seen, 6), seen_fit_on=fit_on)


# ---------------------------------------------------------------- the answer

UNKNOWN = "unknown"


# The default threshold holds for vocabularies of distinct labels up to this size (measured on 3 to 640;
# ImageNet-1K names a tabby at 31%). WordNet's 82K terms split a photo's mass over near-synonyms (chelsea:
# 0.1% for each of "tiger cat", "cat", ...), so there the default is no threshold: give one explicitly.
THRESHOLD_MAX_LABELS = 1000


def resolve_threshold(model, min_confidence: float | None, n_labels: int = 0) -> float:
    """The threshold to use: the one given (a probability in [0, 1]), else the model's default for a
    vocabulary of n_labels (0, always answer, above THRESHOLD_MAX_LABELS)."""
    if min_confidence is None:
        return float(model.confidence.min_confidence) if n_labels <= THRESHOLD_MAX_LABELS else 0.0
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise DeviseError(f"min_confidence must be a probability between 0 and 1, not {min_confidence}")
    return float(min_confidence)


def answer(predictions: list[dict], min_confidence: float) -> str:
    """The label an image is given: its top prediction's, or "unknown" when that label's probability is
    below min_confidence (the nearest labels are still listed beside it)."""
    if not predictions or predictions[0].get("probability", 1.0) < min_confidence:
        return UNKNOWN
    return predictions[0]["label"]


def store_confidence(run, model, features, true, vectors, names, fit_on: str = "validation") -> Confidence:
    """Fit a run's temperature and threshold with `model` (the run, or its stage-1 model that did not see
    the validation classes) on validation features against their vocabulary (vectors, names), and record
    them in the run's settings (settings.json rewritten atomically when the run has a folder)."""
    if len(true) < MIN_FIT_IMAGES or len(names) < MIN_FIT_CLASSES:
        # A threshold from a handful of images would be noise: no threshold (always answer), default T.
        conf = Confidence(fit_on=f"not fit: {len(true)} validation images of {len(names)} classes (fewer than "
                                 f"{MIN_FIT_IMAGES} / {MIN_FIT_CLASSES}); no default threshold")
    else:
        embeddings = model.encode_features(np.asarray(features, np.float32))
        matrix = model.vectors_for(vectors, names)
        conf = fit_confidence(embeddings @ matrix.T, np.asarray(true), embeddings, background_pool(run.vectors_spec),
                              matrix, fit_on=f"{fit_on}: {len(true)} images, {len(names)} classes")
        if list(names) == list(run.class_names):  # held-out images of the training classes: a seen-class fit
            conf = replace(conf, seen_temperature=conf.temperature, seen_fit_on=conf.fit_on)
    run.settings["confidence"] = conf.to_dict()
    if run.path is not None:
        atomic_write_json(run.path / "settings.json", run.settings, indent=2, sort_keys=True)
    return conf
