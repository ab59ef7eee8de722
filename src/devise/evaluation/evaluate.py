"""The paper's evaluation of one trained model on a zero-shot split: the numbers behind every table.

- zero-shot (label space = unseen classes): flat hit@1/2/5/10, per-class top-1, hp@2/5/10/20 on the
  images whose class has a WordNet synset;
- seen classes in a held-out style (label space = training classes): hit@k and hp@k;
- generalized zero-shot (label space = training + unseen classes): u, s, H, raw and with calibrated
  stacking, the constant chosen on validation data (validation classes as "unseen", a held-out style of
  the training classes as "seen"), never on test images;
- confidence (devise.evaluation.confidence), on the unseen and on the seen-class test images: known (the vocabulary
  holds the image's class) vs unknown (its class removed) AUROC and FPR@95%TPR of the top-1 probability
  and of the raw top-1 cosine, AURC of top-1 answers, ECE before (T=1) and after the temperature, and the
  same known/unknown test with 3-label vocabularies; the temperature and threshold fit on validation.
`devise evaluate RUN_DIR` runs this for a run folder written by `devise train`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devise.evaluation import metrics
from devise.evaluation.confidence import (Confidence, fit_confidence, fit_seen_temperature, image_offset, probabilities,
                               select_background)
from devise.data.datasets import load_dataset, validation_split, zero_shot_split
from devise.errors import DeviseError
from devise.data.features import extract_features
from devise.models.model import load_model_folder
from devise.training.train import CLASS_TEXTS, class_label_vectors, reportable_ks
from devise.labels.vectors import load_vectors, unit_rows
from devise.labels.wordnet import load_wordnet

HIT_KS = (1, 2, 5, 10)
HP_KS = (2, 5, 10, 20)


@dataclass
class LabelSpace:
    """Classes of a dataset that have a vector: names, unit vectors and synsets, indexed by class id."""

    names: list[str]
    vectors: np.ndarray  # (C, D), zero rows for classes without a vector
    wnids: list[str | None]
    has_vector: np.ndarray  # (C,) bool

    def subset(self, classes) -> tuple[list[str], np.ndarray, list[str | None]]:
        classes = np.asarray(classes, dtype=np.int64)
        return [self.names[c] for c in classes], self.vectors[classes], [self.wnids[c] for c in classes]


def relabel(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Dataset class ids -> positions in `classes` (-1 where absent)."""
    position = np.full(int(max(labels.max(initial=0), classes.max(initial=0))) + 1, -1)
    position[classes] = np.arange(len(classes))
    return position[labels]


def ranking_metrics(scores: np.ndarray, true: np.ndarray, label_wnids, wordnet, per_class: bool = False) -> dict:
    """hit@k (and per-class top-1) over all images; hp@k over images whose true label has a synset.

    A k at or above the number of labels is left out: every label is then in the top k (hit@k = 1.0).
    """
    n_labels = scores.shape[1]
    hit_ks = reportable_ks(HIT_KS, n_labels)
    out = {f"hit@{k}": v for k, v in metrics.flat_hit_at_k(scores, true, hit_ks).items()} if hit_ks else {}
    if per_class and hit_ks:
        out["per_class_top1"] = metrics.per_class_top1(metrics.top_k_indices(scores, 1)[:, 0], true)
    has_synset = np.array([label_wnids[t] is not None for t in true])
    hp_ks = reportable_ks(HP_KS, n_labels)
    if has_synset.any() and hp_ks:
        hp = metrics.hierarchical_precision_at_k(scores[has_synset], true[has_synset], label_wnids, wordnet, hp_ks)
        out.update({f"hp@{k}": v for k, v in hp.items()})
    return {k: float(v) for k, v in out.items()}


def evaluate_split(model, features: np.ndarray, labels: np.ndarray, space: LabelSpace, *, train_classes,
                   unseen_classes, seen_test, unseen_images, gamma: float | None = None, wordnet=None,
                   softmax_only: bool = False, logits: np.ndarray | None = None,
                   confidence: Confidence | None = None, pool: np.ndarray | None = None) -> dict:
    """All metrics of one model. Image index arrays refer to rows of `features` / `labels` (and `logits`,
    the backbone's ImageNet logits, which ConSE over the backbone's own classifier scores from).

    train_classes: the seen classes the model was fit on (its seen label space).
    gamma: the calibrated-stacking constant, chosen beforehand on validation data (`calibration_gamma`).
    confidence, pool: the model's temperature and threshold (`validation_confidence`) and the background
    candidates (confidence.background_pool): adds "confidence_seen" / "confidence_zsl".
    softmax_only: the model is a plain classifier over train_classes (no zero-shot, no GZSL).
    """
    train_classes = np.asarray(train_classes)
    unseen_classes = np.asarray(unseen_classes)
    result: dict = {}
    rows = lambda index: None if logits is None else logits[index]  # noqa: E731
    seen_test = np.asarray(seen_test, dtype=np.int64)
    seen_y = relabel(labels[seen_test], train_classes)
    seen_test, seen_y = seen_test[seen_y >= 0], seen_y[seen_y >= 0]
    seen_x = features[seen_test]
    names_tr, vec_tr, wn_tr = space.subset(train_classes)
    if softmax_only:
        result["seen"] = ranking_metrics(model.predict_proba(seen_x), seen_y, wn_tr, wordnet)
        return result
    result["seen"] = ranking_metrics(model.predict_scores(seen_x, vec_tr, names_tr, logits=rows(seen_test)),
                                     seen_y, wn_tr, wordnet)
    if confidence is not None:
        result["confidence_fit"] = {"temperature": confidence.temperature, "min_confidence": confidence.min_confidence,
                                    **({} if confidence.seen_temperature is None
                                       else {"seen_temperature": confidence.seen_temperature})}
        seen_emb = model.encode_features(seen_x, rows(seen_test))
        result["confidence_seen"] = confidence_measures(seen_emb, seen_y, unit_vectors(model, vec_tr, names_tr),
                                                        confidence, pool, seen=True)
    if len(unseen_classes) == 0:  # a run trained on every class: nothing to score zero-shot
        return result

    names_un, vec_un, wn_un = space.subset(unseen_classes)
    un_x, un_y = features[unseen_images], relabel(labels[unseen_images], unseen_classes)
    result["zsl"] = ranking_metrics(model.predict_scores(un_x, vec_un, names_un, logits=rows(unseen_images)),
                                    un_y, wn_un, wordnet, per_class=True)
    if confidence is not None:
        un_emb = model.encode_features(un_x, rows(unseen_images))
        result["confidence_zsl"] = confidence_measures(un_emb, un_y, unit_vectors(model, vec_un, names_un),
                                                       confidence, pool)

    # GZSL: every test image (seen held-out style + unseen) against training + unseen classes.
    test = gzsl_set(features, labels, space, train_classes, unseen_classes, seen_test, unseen_images, logits)
    test_scores = test.scores(model)
    result["gzsl"] = {k: float(v) for k, v in metrics.generalized_zero_shot(
        test_scores, test.y, test.seen_mask, test.is_unseen).items()}
    if gamma is not None:
        calibrated = metrics.generalized_zero_shot(test_scores, test.y, test.seen_mask, test.is_unseen, gamma=gamma)
        result["gzsl_calibrated"] = {**{k: float(v) for k, v in calibrated.items()}, "gamma": float(gamma)}
    return result


@dataclass
class GZSLSet:
    """Images of seen and unseen classes, each labelled over seen + unseen classes (seen ones first)."""

    x: np.ndarray
    logits: np.ndarray | None
    y: np.ndarray
    is_unseen: np.ndarray  # per image
    seen_mask: np.ndarray  # per label
    names: list[str]
    vectors: np.ndarray

    def scores(self, model) -> np.ndarray:
        return model.predict_scores(self.x, self.vectors, self.names, logits=self.logits)


def gzsl_set(features, labels, space: LabelSpace, seen_classes, unseen_classes, seen_images, unseen_images,
             logits: np.ndarray | None = None) -> GZSLSet:
    """The GZSL problem of a test (or, with validation classes as the unseen ones, a calibration) set:
    images whose class is in neither list are left out."""
    seen_classes, unseen_classes = np.asarray(seen_classes), np.asarray(unseen_classes)
    seen_images, unseen_images = np.asarray(seen_images, np.int64), np.asarray(unseen_images, np.int64)
    s_y, u_y = relabel(labels[seen_images], seen_classes), relabel(labels[unseen_images], unseen_classes)
    seen_images, s_y, unseen_images, u_y = seen_images[s_y >= 0], s_y[s_y >= 0], unseen_images[u_y >= 0], u_y[u_y >= 0]
    images = np.concatenate([seen_images, unseen_images])
    names, vectors, _ = space.subset(np.concatenate([seen_classes, unseen_classes]))
    return GZSLSet(x=features[images], logits=None if logits is None else logits[images],
                   y=np.concatenate([s_y, u_y + len(seen_classes)]),
                   is_unseen=np.arange(len(images)) >= len(seen_images),
                   seen_mask=np.arange(len(names)) < len(seen_classes), names=names, vectors=vectors)


def calibration_gamma(model, features: np.ndarray, labels: np.ndarray, space: LabelSpace, *, train_classes,
                      val_classes, seen_images, val_images, logits: np.ndarray | None = None) -> float:
    """The calibrated-stacking constant chosen on VALIDATION data: images of held-out validation classes
    play the unseen ones, held-out images of the training classes the seen ones (never test images).
    logits: the backbone's ImageNet logits, indexed like features (ConSE over its own classifier)."""
    val = gzsl_set(features, labels, space, train_classes, val_classes, seen_images, val_images, logits)
    return float(metrics.choose_calibration(val.scores(model), val.y, val.seen_mask, val.is_unseen))


def unit_vectors(model, vectors, names) -> np.ndarray:
    """The label vectors a model scores with (the random control's are seeded by name)."""
    return model.vectors_for(vectors, names) if hasattr(model, "vectors_for") else unit_rows(vectors)


RISK_COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # points of the risk-coverage plot
SMALL_VOCABULARY = 3  # the handful-of-labels test: vocabularies of this many classes


def class_removed(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, L) scores with each image's own class taken out of the vocabulary (-inf): the "unknown" copy."""
    removed = np.array(scores, copy=True)
    removed[np.arange(len(true)), true] = -np.inf
    return removed


def small_vocabularies(true: np.ndarray, n_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(known, unknown) columns of SMALL_VOCABULARY-label vocabularies per image, seeded: the image's class
    and SMALL_VOCABULARY - 1 others, and SMALL_VOCABULARY others (distinct, never the image's own)."""
    offsets = 1 + np.argsort(np.random.default_rng(seed).random((len(true), n_labels - 1)), axis=1)[:, :SMALL_VOCABULARY]
    others = (true[:, None] + offsets) % n_labels
    return np.concatenate([true[:, None], others[:, 1:]], axis=1), others


def validation_confidence(model, features: np.ndarray, labels: np.ndarray, space: LabelSpace, *, val_classes,
                          val_images, pool: np.ndarray, logits: np.ndarray | None = None,
                          fit_on: str = "validation classes", train_classes=None, seen_images=None) -> Confidence:
    """The temperature and default threshold of a model, fit on VALIDATION images against the validation
    classes (zero-shot, as users ask new labels), never on test images. With train_classes and
    seen_images (held-out images of the training classes, e.g. a held-out style), also its seen-class
    temperature (confidence.fit_seen_temperature)."""
    def problem(images, classes):
        images = np.asarray(images, np.int64)
        y = relabel(labels[images], np.asarray(classes))
        images, y = images[y >= 0], y[y >= 0]
        names, vectors, _ = space.subset(classes)
        embeddings = model.encode_features(features[images], None if logits is None else logits[images])
        matrix = unit_vectors(model, vectors, names)
        return embeddings @ matrix.T, y, embeddings, pool, matrix

    scores, y, *rest = problem(val_images, val_classes)
    conf = fit_confidence(scores, y, *rest, fit_on=f"{fit_on}: {len(y)} images, {scores.shape[1]} classes")
    if seen_images is None or len(seen_images) == 0:
        return conf
    scores, y, *rest = problem(seen_images, train_classes)
    return fit_seen_temperature(conf, scores, y, *rest, fit_on=f"held-out images of the training classes: "
                                                                f"{len(y)} images, {scores.shape[1]} classes")


def confidence_measures(embeddings: np.ndarray, true: np.ndarray, matrix: np.ndarray, conf: Confidence,
                        pool: np.ndarray | None, seed: int = 0, seen: bool = False) -> dict:
    """Known vs unknown, selective prediction and calibration of one set of images against a vocabulary
    (`matrix`, unit rows; true: each image's row). "known": the vocabulary as it is; "unknown": the image's
    class removed. The probability against the raw top-1 cosine; ECE before (T=1) and after the temperature;
    `risk@c`: the error rate of the fraction c most confident answers (the risk-coverage curve).
    seen: the vocabulary is the model's training classes (their seen_temperature, where fit)."""
    # Every label a training class: their temperature (the background's stays conf.temperature).
    label_t = conf.seen_temperature if seen and conf.seen_temperature is not None else conf.temperature
    rows = np.arange(len(true))
    background = (select_background(pool, matrix, conf.background) if conf.background and pool is not None
                  else np.zeros((0, matrix.shape[1]), np.float32))
    extra = embeddings @ background.T
    scores = embeddings @ matrix.T
    removed = class_removed(scores, true)
    top = lambda s, t=label_t, bt=conf.temperature: probabilities(s, t, extra, bt).max(axis=1)  # noqa: E731
    known, unknown = top(scores), top(removed)
    correct = scores.argmax(axis=1) == true
    out = {"auroc": metrics.auroc(known, unknown), "fpr95": metrics.fpr_at_tpr(known, unknown),
           "auroc_cosine": metrics.auroc(scores.max(axis=1), removed.max(axis=1)),
           "fpr95_cosine": metrics.fpr_at_tpr(scores.max(axis=1), removed.max(axis=1)),
           **_normalised_measures(scores, removed, embeddings, pool),
           "aurc": metrics.aurc(known, correct), "aurc_cosine": metrics.aurc(scores.max(axis=1), correct),
           "ece": metrics.expected_calibration_error(known, correct),
           "ece_t1": metrics.expected_calibration_error(top(scores, 1.0, 1.0), correct),
           "kept_known": float(np.mean(known >= conf.min_confidence)),
           "unknown_rejected": float(np.mean(unknown < conf.min_confidence))}
    # A handful of labels: the class and 2 others ("known") vs 3 others ("unknown"), seeded.
    n_labels = matrix.shape[0]
    if n_labels > SMALL_VOCABULARY:
        small_known, others = small_vocabularies(true, n_labels, seed)
        small = lambda picks: probabilities(scores[rows[:, None], picks], label_t, extra, conf.temperature).max(axis=1)  # noqa: E731
        k3, u3 = small(small_known), small(others)
        out.update(auroc_3labels=metrics.auroc(k3, u3), kept_known_3labels=float(np.mean(k3 >= conf.min_confidence)),
                   unknown_rejected_3labels=float(np.mean(u3 < conf.min_confidence)))
    coverage, risk = metrics.risk_coverage(known, correct)
    _, risk_cos = metrics.risk_coverage(scores.max(axis=1), correct)
    for c in RISK_COVERAGES:
        at = max(0, int(np.ceil(c * len(true))) - 1)
        out[f"risk@{c:.1f}"], out[f"risk_cosine@{c:.1f}"] = float(risk[at]), float(risk_cos[at])
    return out


def _normalised_measures(scores, removed, embeddings, pool) -> dict:
    """Known vs unknown AUROC / FPR@95 of the image-normalised top-1 cosine (confidence.image_offset)."""
    if pool is None or len(pool) == 0:
        return {}
    offset = image_offset(embeddings, pool)
    known, unknown = scores.max(axis=1) - offset, removed.max(axis=1) - offset
    return {"auroc_normalised": metrics.auroc(known, unknown), "fpr95_normalised": metrics.fpr_at_tpr(known, unknown)}


def evaluate_run(run_dir, dataset=None) -> dict:
    """`devise evaluate`: the metrics of a run folder written by `devise train`, on its own split."""
    run = load_model_folder(run_dir)
    settings = run.settings
    spec = dataset or settings.get("dataset")
    if spec is None:
        raise DeviseError(f"{run_dir}: the run does not record its dataset; pass DATASET")
    ds = load_dataset(spec)
    space = label_space(ds, run.vectors_spec, texts=settings.get("class_texts", "one"))
    # Runs from before unseen_fraction was recorded all held out 25% of the classes.
    split = zero_shot_split(ds, seed=int(settings.get("split_seed", settings.get("seed", 0))),
                            unseen_fraction=float(settings.get("unseen_fraction", 0.25)))
    val = validation_split(split, seed=int(settings.get("split_seed", settings.get("seed", 0))))
    fs = extract_features(ds, run.backbone)  # the run's backbone, fine-tuned or pretrained
    usable = np.asarray(fs.valid) & space.has_vector[np.asarray(ds.labels)]
    features = np.asarray(fs.features, np.float32)
    labels = np.asarray(ds.labels)
    train_classes = np.asarray(settings.get("train_classes", val.train_classes))
    unseen = np.asarray([c for c in split.unseen_classes if space.has_vector[c]])
    names = [space.names[c] for c in train_classes]
    if names != list(run.class_names):
        raise DeviseError(f"{run_dir}: its training classes do not match {spec}'s split (different dataset or seed?)")
    pick = lambda idx: np.asarray([i for i in idx if usable[i]], dtype=np.int64)  # noqa: E731
    if len(unseen) == 0:
        print(f"{run_dir}: trained on every class of {spec}, so there are no unseen classes to score zero-shot "
              "(train with --holdout-unseen FRACTION for that); seen classes on held-out images only", flush=True)
    return evaluate_split(run, features, labels, space, train_classes=train_classes, unseen_classes=unseen,
                          seen_test=pick(split.seen_test), unseen_images=pick(split.unseen),
                          wordnet=load_wordnet(), softmax_only=run.method == "softmax" and run.label_vectors is None)


def label_space(dataset, vectors_spec: str, texts: str = CLASS_TEXTS) -> LabelSpace:
    """Vectors for every class of a dataset (by name, else its synset); classes with neither are dropped.
    texts: the class text rule (train.class_label_vectors) the model was trained with."""
    matrix, kept, report = class_label_vectors(dataset, load_vectors(vectors_spec), drop_missing=True, texts=texts)
    print(report, flush=True)
    wnids = list(dataset.wnids) if dataset.wnids is not None else [None] * len(dataset.classes)
    return LabelSpace(list(dataset.classes), matrix, wnids, np.asarray(kept, bool))


def metrics_table(rows: dict[str, dict], columns: list[str], stds: dict[str, dict] | None = None,
                 percent: tuple[str, ...] = ("hit@", "per_class", "u", "s", "H")) -> str:
    """A markdown table: one row per method, mean (± std) per column; flat hit@k in %, hp@k as fractions."""
    def cell(method, col):
        value = rows[method].get(col)
        if value is None:
            return "-"
        scale = 100 if col.startswith(percent) else 1
        fmt = "{:.1f}" if scale == 100 else "{:.3f}"
        text = fmt.format(value * scale)
        if stds and col in stds.get(method, {}):
            text += " ± " + fmt.format(stds[method][col] * scale)
        return text

    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + m + " | " + " | ".join(cell(m, c) for c in columns) + " |" for m in rows]
    return "\n".join(lines)
