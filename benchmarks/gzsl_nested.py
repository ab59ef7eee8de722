"""Which GZSL calibration protocol, chosen without unseen classes or test images: the benchmark run again
inside its own seen classes.

Per outer seed, the benchmark's seen classes (never its unseen ones) and every style except its test style
('twitter') form a smaller benchmark in which a stand-in style (PSEUDO_TEST, default openmoji) plays the
test style. benchmark.run_seed then does there exactly what `devise benchmark` does (a seen/unseen class
split, validation classes, a calibration style held out of training, a two-stage fit, calibrated
stacking chosen on validation data) with the calibration protocol under test, and its calibrated H on the
stand-in test is what the protocol is judged by. Also printed: the oracle H (gamma chosen on that stand-in
test itself), the headroom left for calibration; with ALTERNATIVES=1, the oracle H of other decision rules
(gates on other signals, hubness corrections) and other compositions of the trained models.

    PSEUDO_TEST=fluent_3d DROP=fluent_flat python benchmarks/gzsl_nested.py   # the benchmark's protocol (its logs)
    CAL=fluent_flat,fluent_3d PSEUDO_TEST=openmoji python benchmarks/gzsl_nested.py   # a second test style
    CAL=noto REFIT=0 PSEUDO_TEST=fluent_3d DROP=fluent_flat python benchmarks/gzsl_nested.py   # the old protocol
    PSEUDO_TEST=fluent_3d DROP=fluent_flat ALTERNATIVES=1 python benchmarks/gzsl_nested.py      # today's, + others
    BACKBONE=efficientnet_lite0 PSEUDO_TEST=fluent_3d DROP=fluent_flat python benchmarks/gzsl_nested.py  # on Lite0 alone
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

import devise  # noqa: F401
from devise.evaluation import benchmark, evaluate, metrics
from devise import defaults
from devise.data.datasets import DEFAULT_TEST_STYLE, load_dataset, zero_shot_split
from devise.evaluation.evaluate import label_space
from devise.data.features import extract_features
from devise.evaluation.ranking import label_statistics
from devise.labels.vectors import unit_rows
from devise.labels.wordnet import load_wordnet

BACKBONE = os.environ.get("BACKBONE", defaults.TRAIN_BACKBONE)  # the features every method trains on
SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "0,1,2").split(","))
PSEUDO_TEST = os.environ.get("PSEUDO_TEST", "openmoji")
CAL = tuple(os.environ.get("CAL", ",".join(benchmark.CALIBRATION_STYLES)).split(","))
DROP = tuple(filter(None, os.environ.get("DROP", "").split(",")))  # styles left out of the inner benchmark
ALTERNATIVES = os.environ.get("ALTERNATIVES", "0") == "1"  # also the oracle H of other decision rules
REFIT = os.environ.get("REFIT", "1" if benchmark.REFIT_WITH_CALIBRATION else "0") == "1"  # stage 2 also trains on the calibration style
METHODS = os.environ.get("METHODS", "softmax,devise_hinge_mlp,devise_softmax_mlp,conse_t10,devise_conse_mean").split(",")


def inner_dataset(dataset, seed: int):
    """The outer split's seen classes, every style but the test style, PSEUDO_TEST renamed to the test style."""
    outer = zero_shot_split(dataset, seed=seed)
    styles = np.asarray(dataset.styles)
    keep = np.flatnonzero(np.isin(dataset.labels, outer.seen_classes) & (styles != DEFAULT_TEST_STYLE)
                      & ~np.isin(styles, DROP))
    new_label = {int(c): i for i, c in enumerate(outer.seen_classes)}
    inner_styles = np.where(styles[keep] == PSEUDO_TEST, DEFAULT_TEST_STYLE, styles[keep])
    per_class = lambda values: [values[c] for c in outer.seen_classes] if len(values) == dataset.num_classes else values  # noqa: E731
    sub = dataclasses.replace(
        dataset, name=f"{dataset.name}-inner{seed}", paths=[dataset.paths[i] for i in keep],
        labels=np.asarray([new_label[int(c)] for c in np.asarray(dataset.labels)[keep]], np.int32),
        classes=per_class(dataset.classes), wnids=per_class(dataset.wnids), styles=inner_styles,
        match=per_class(dataset.match))
    return sub, keep


_evaluate_split = evaluate.evaluate_split


def oracle_h(scores, y, is_unseen, n_seen) -> float:
    """H of calibrated stacking with the best gamma for THESE images (headroom only, never a choice)."""
    seen_mask = np.arange(scores.shape[1]) < n_seen
    g = metrics.choose_calibration(scores, y, seen_mask, is_unseen)
    return metrics.generalized_zero_shot(scores, y, seen_mask, is_unseen, gamma=g)["H"]


def gated_oracle_h(signal, scores, y, is_unseen, n_seen) -> float:
    """H of 'the best seen label if signal > t, else the best unseen label', at the best t for these images."""
    seen_pred, unseen_pred = scores[:, :n_seen].argmax(1), scores[:, n_seen:].argmax(1) + n_seen
    best = 0.0
    for t in np.quantile(signal, np.linspace(0, 1, 201)):
        pred = np.where(signal > t, seen_pred, unseen_pred)
        u = metrics.per_class_top1(pred[is_unseen], y[is_unseen])
        s = metrics.per_class_top1(pred[~is_unseen], y[~is_unseen])
        best = max(best, 2 * u * s / (u + s) if u + s else 0.0)
    return best


def evaluate_with_oracle(model, features, labels, space, **kw):
    """benchmark's evaluate_split, plus the H of the best gamma on these test images (headroom only)."""
    result = _evaluate_split(model, features, labels, space, **kw)
    if "gzsl" in result:
        test = evaluate.gzsl_set(features, labels, space, *(kw[k] for k in (
            "train_classes", "unseen_classes", "seen_test", "unseen_images")))
        result["gzsl_oracle"] = {"H": oracle_h(test.scores(model), test.y, test.is_unseen, int(test.seen_mask.sum()))}
    return result


def alternatives(models, features, labels, space, split, usable) -> dict:
    """Oracle H of other GZSL decision rules and compositions on the inner test (ALTERNATIVES=1)."""
    pick = lambda idx: np.asarray([i for i in idx if usable[i]], np.int64)  # noqa: E731
    has_vec = lambda cs: np.asarray([c for c in cs if space.has_vector[c]], np.int64)  # noqa: E731
    test = evaluate.gzsl_set(features, labels, space, has_vec(split.seen_classes), has_vec(split.unseen_classes),
                             pick(split.seen_test), pick(split.unseen))
    x, y, is_unseen, n, names = test.x, test.y, test.is_unseen, int(test.seen_mask.sum()), test.names
    vectors = unit_rows(test.vectors)
    mean = lambda a, b, w=0.5: benchmark.EmbeddingMean(a, b, w)  # noqa: E731
    conse_t = lambda t: dataclasses.replace(models["conse_t10"], settings={**models["conse_t10"].settings, "T": t})  # noqa: E731
    base = mean(models["devise_softmax_mlp"], models["conse_t10"])
    out = {}
    compositions = {"mean w0.5": base, "mean w0.3": mean(models["devise_softmax_mlp"], models["conse_t10"], 0.3),
                    "mean w0.7": mean(models["devise_softmax_mlp"], models["conse_t10"], 0.7),
                    **{f"mean T{t}": mean(models["devise_softmax_mlp"], conse_t(t)) for t in (3, 5, 20)},
                    "mean of 3 (+ hinge MLP)": mean(base, models["devise_hinge_mlp"], 2 / 3)}
    for name, model in compositions.items():
        out[name] = oracle_h(model.predict_scores(x, vectors, names), y, is_unseen, n)
    scores = base.predict_scores(x, vectors, names)
    reference = base.encode_features(features[pick(split.train)])
    knn_mean, label_mean = label_statistics(reference, vectors)
    out["hubness: centred on the training images"] = oracle_h(scores - label_mean, y, is_unseen, n)
    out["hubness: CSLS against the training images"] = oracle_h(2 * scores - knn_mean, y, is_unseen, n)
    proba = models["softmax"].predict_proba(x)
    margin = scores[:, :n].max(1) - scores[:, n:].max(1)
    lse = lambda a, t: a.max(1) + t * np.log(np.exp((a - a.max(1, keepdims=True)) / t).sum(1))  # noqa: E731
    signals = {"gate: seen-unseen margin (= calibrated stacking)": margin,
               "gate: softmax top probability": proba.max(1),
               "gate: softmax negative entropy": (proba * np.log(proba + 1e-12)).sum(1),
               "gate: margin + top probability": margin / margin.std() + proba.max(1) / proba.max(1).std(),
               **{f"gate: log-sum-exp margin, T={t}": lse(scores[:, :n], t) - lse(scores[:, n:], t) for t in (0.02, 0.05, 0.1)}}
    for name, signal in signals.items():
        out[name] = gated_oracle_h(signal, scores, y, is_unseen, n)
    # An upper bound for a learnt gate: logistic regression on all the signals, fit on the test images themselves.
    X = np.stack([*signals.values(), scores[:, :n].max(1), scores[:, n:].max(1)], 1)
    X = np.concatenate([(X - X.mean(0)) / X.std(0), np.ones((len(X), 1))], 1)
    target = (~is_unseen).astype(np.float64)
    weight = np.where(target == 1, 0.5 / target.mean(), 0.5 / (1 - target.mean()))
    w = np.zeros(X.shape[1])
    for _ in range(3000):
        w -= 0.5 * X.T @ ((1 / (1 + np.exp(-X @ w)) - target) * weight) / len(X)
    out["gate: logistic regression on all of them, fit in-sample"] = gated_oracle_h(X @ w, scores, y, is_unseen, n)
    return out


def main() -> None:
    benchmark.CALIBRATION_STYLES = CAL
    benchmark.REFIT_WITH_CALIBRATION = REFIT
    benchmark.evaluate_split = evaluate_with_oracle
    dataset = load_dataset("emoji")
    fs = extract_features(dataset, BACKBONE)
    features, valid = np.asarray(fs.features, np.float32), np.asarray(fs.valid)
    wordnet = load_wordnet()
    rows, alt_rows = {}, {}
    for seed in SEEDS:
        t0 = time.time()
        sub, keep = inner_dataset(dataset, seed)
        space = label_space(sub, "minilm")
        usable = valid[keep] & space.has_vector[sub.labels]
        results, models = benchmark.run_seed(sub, features[keep], None, usable, space, seed, METHODS, wordnet,
                                        "minilm", {}, log=lambda *a: None)
        for method, r in results.items():
            if "gzsl_calibrated" not in r:
                continue
            row = {"seed": seed, "method": method, "cal": "+".join(CAL), "refit": REFIT, "drop": DROP, "pseudo_test": PSEUDO_TEST,
                   "zsl_hit@1": r["zsl"]["hit@1"], "seen_hit@1": r["seen"]["hit@1"],
                   **{f"cal_{k}": v for k, v in r["gzsl_calibrated"].items()},
                   "oracle_H": r["gzsl_oracle"]["H"]}
            rows.setdefault(method, []).append(row)
            print("ROW " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if ALTERNATIVES:
            alt = alternatives(models, features[keep], np.asarray(sub.labels), space, zero_shot_split(sub, seed=seed), usable)
            for name, h in alt.items():
                alt_rows.setdefault(name, []).append(h)
            print("ALT " + json.dumps({"seed": seed, **{k: round(v, 4) for k, v in alt.items()}}), flush=True)
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    for method, rs in rows.items():
        mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        print(f"RESULT {json.dumps({'method': method, 'backbone': BACKBONE, 'cal': '+'.join(CAL), 'refit': REFIT, 'drop': DROP, 'pseudo_test': PSEUDO_TEST, 'seeds': list(SEEDS), **{k: round(mean(k), 4) for k in ('cal_u', 'cal_s', 'cal_H', 'oracle_H', 'zsl_hit@1', 'seen_hit@1')}})}")

    for name, hs in alt_rows.items():
        print(f"| {name} | {100 * np.mean(hs):.1f} |")


if __name__ == "__main__":
    main()