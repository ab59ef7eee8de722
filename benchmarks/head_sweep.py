"""Which DeViSE head settings, chosen on validation classes only: label_text.py's protocol, more settings.

Candidate syntax: TEXT@softmax[;key=value...] (TEXT a label_text.py rule: hyper, name+gloss+hyper, ...), or
TEXT@classifier for the softmax baseline (ConSE T=10 for zero-shot). The base setting is one
devise_softmax_mlp head with patience 8 (what the recipe was before this sweep). Keys: temperature,
learning_rate, patience, glove (weight of a unit GloVe-50 vector concatenated to the unit MiniLM
vector, renormalised), center / whiten (of the label vectors, by the training classes' statistics),
ens (the unit mean of K heads, seeds seed + 1000 k), fixed (a fixed epoch count, no early stopping).
The sweep behind presets.py's devise_softmax_mlp also tried hidden, dropout, label smoothing and a
free-norm loss with a patched train(); those rows (no gain) are in benchmarks/results/head_sweep/.
Per seed 0-2: zero-shot hit@1/5 of validation images over validation classes, hit@1/5 of the held-out
'noto' style over training classes, and a GZSL H over both (validation images + noto images, all
training + validation classes): at gamma 0 and with calibrated stacking chosen on those same images
(in-sample, so optimistic, but the same for every candidate).

    python benchmarks/head_sweep.py "hyper@softmax" "name+gloss+hyper@softmax;patience=15;ens=5"
    SEEDS=0,1,2,3,4,5,6,7,8,9 python benchmarks/head_sweep.py ...    # the README's paired comparison
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import devise  # noqa: F401
from devise.evaluation.benchmark import METHODS, _calibration_holdout
from devise.data.datasets import validation_split, zero_shot_split
from devise.evaluation.evaluate import relabel
from devise.evaluation.metrics import choose_calibration, flat_hit_at_k, generalized_zero_shot
from devise.training.train import class_label_vectors, train
from devise.labels.vectors import GLOVE_SPEC, load_vectors, unit_rows

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from label_text import benchmark_inputs, class_texts  # noqa: E402

SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "0,1,2").split(","))
BASE = {k: v for k, v in METHODS["devise_softmax_mlp"].items() if k not in ("method", "ensemble", "patience")}
CAST = {"temperature": float, "glove": float, "learning_rate": float, "center": float, "patience": int,
        "whiten": float, "ens": int, "fixed": int}


def parse(candidate: str):
    head, *opts = candidate.split(";")
    rule, setting = head.split("@")
    assert setting in ("softmax", "classifier"), setting
    options = {k: CAST[k](v) for k, v in (o.split("=") for o in opts)}
    return rule, options


def main(candidates):
    dataset, features, valid, labels, wordnet, encoder = benchmark_inputs()
    glove = None
    for candidate in candidates:
        t0 = time.time()
        rule, options = parse(candidate)
        classifier = candidate.split(";")[0].endswith("@classifier")
        vectors = unit_rows(sum(encoder.encode(class_texts(dataset, wordnet, r)) for r in rule.split("+")))
        if "glove" in options:
            if glove is None:
                glove, kept, report = class_label_vectors(dataset, load_vectors(GLOVE_SPEC), drop_missing=True)
                print(report, flush=True)
            vectors = unit_rows(np.concatenate([vectors, options.pop("glove") * glove], axis=1))
        center = options.pop("center", 0.0)
        whiten = options.pop("whiten", 0.0)
        base_vectors = vectors
        ens = options.pop("ens", 1)
        fixed = options.pop("fixed", 0)
        settings = {**BASE, **options}
        scores = []
        for seed in SEEDS:
            split = zero_shot_split(dataset, seed=seed)
            val = validation_split(split, seed=seed)
            pick = lambda idx: np.asarray([i for i in idx if valid[i]], np.int64)  # noqa: E731
            train_c, val_c = np.asarray(val.train_classes), np.asarray(val.val_classes)
            vectors = base_vectors
            if center or whiten:  # statistics of the TRAINING classes' vectors only
                mean = vectors[train_c].mean(0)
                vectors = vectors - center * mean
                if whiten:  # shrink the top principal directions: eigenvalues ** -whiten/2
                    u, sv, vt = np.linalg.svd(vectors[train_c] - vectors[train_c].mean(0), full_matrices=False)
                    lam = sv ** 2 / len(train_c)
                    scale = (lam / lam.mean()) ** (-whiten / 2)
                    vectors = vectors + ((vectors @ vt.T) * (scale - 1)) @ vt
                vectors = unit_rows(vectors)
            held_style = _calibration_holdout(dataset, pick(val.train), seed, styles=("noto",))
            fit = np.setdiff1d(pick(val.train), held_style)
            val_images = pick(val.val)
            names = lambda classes: [dataset.classes[c] for c in classes]  # noqa: E731
            runs = []
            for member in range(ens):  # ens > 1: the unit mean of several heads' embeddings (seeds differ)
                zs_val = (features[val_images], relabel(labels[val_images], val_c), vectors[val_c], names(val_c))
                if classifier:  # the softmax baseline as the benchmark fits it (early stopping on noto)
                    runs.append(train("softmax", features[fit], relabel(labels[fit], train_c), names(train_c),
                                      vectors[train_c], val=(features[held_style], relabel(labels[held_style], train_c)),
                                      seed=seed, verbose=0, T=10))
                    continue
                runs.append(train("devise", features[fit], relabel(labels[fit], train_c), names(train_c),
                                  vectors[train_c], val=None if fixed else zs_val,
                                  seed=seed + 1000 * member, verbose=0,
                                  **({**settings, "epochs": fixed} if fixed else settings)))
            ev = unit_rows(sum(r.embed(features[val_images]) for r in runs))
            eh = unit_rows(sum(r.embed(features[held_style]) for r in runs))
            yv, yh = relabel(labels[val_images], val_c), relabel(labels[held_style], train_c)
            zsl = flat_hit_at_k(ev @ vectors[val_c].T, yv, (1, 5))
            seen = flat_hit_at_k(runs[0].predict_proba(features[held_style]) if classifier
                                 else eh @ vectors[train_c].T, yh, (1, 5))
            both = vectors[np.concatenate([train_c, val_c])]
            s_all = np.concatenate([eh, ev]) @ both.T
            y_all = np.concatenate([yh, yv + len(train_c)])
            is_unseen = np.arange(len(y_all)) >= len(yh)
            seen_mask = np.arange(len(both)) < len(train_c)
            h0 = generalized_zero_shot(s_all, y_all, seen_mask, is_unseen, 0.0)["H"]
            gamma = choose_calibration(s_all, y_all, seen_mask, is_unseen)
            hc = generalized_zero_shot(s_all, y_all, seen_mask, is_unseen, gamma)
            scores.append([zsl[1], zsl[5], seen[1], seen[5], h0, hc["H"], hc["u"], hc["s"],
                           np.mean([r.history.get("best_epoch") or fixed for r in runs])])
            print(f"  {candidate} seed {seed}: " + " ".join(f"{x:.3f}" for x in scores[-1]), flush=True)
        a = np.asarray(scores)
        keys = ["zsl@1", "zsl@5", "noto@1", "noto@5", "H0", "Hcal", "u_cal", "s_cal", "best_epoch"]
        result = {"candidate": candidate, **{k: round(float(m), 4) for k, m in zip(keys, a.mean(0))},
                  **{f"std_{k}": round(float(s), 4) for k, s in zip(keys[:6], a.std(0)[:6])},
                  "per_seed": a.round(4).tolist(), "seconds": round(time.time() - t0)}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
