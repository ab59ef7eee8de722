"""Which label TEXT to embed, and which DeViSE loss: chosen on the emoji benchmark's validation classes.

For each candidate (label text rule x training settings) and seeds 0-2: the benchmark's split, the
stage-1 fit on the training classes (early stopping on the validation classes, as devise benchmark does),
then zero-shot hit@1/hit@5 of the validation images against the validation classes, and hit@1/hit@5 of
the held-out 'noto' style of the training classes. Nothing here looks at unseen classes or test images.

Label texts (a class linked to a WordNet synset; classes without one use their name for every rule):
  name         "hot pepper"
  gloss        "hot pepper: any of various pungent capsicum fruits"  (the gloss up to its first ';')
  hyper        "hot pepper, a kind of capsicum"                      (the first hypernym's first lemma;
                                                                     the rule devise uses)
  combo        "hot pepper, a kind of capsicum: any of various pungent capsicum fruits"
  a+b          the unit mean of the unit vectors of rules a and b

    python benchmarks/label_text.py                       # the README's comparison (about 15 min on 2 cores)
    python benchmarks/label_text.py name+gloss+hyper@softmax
Prints a markdown table and one `RESULT {json}` line per candidate.
"""
from __future__ import annotations

import json
import sys

import numpy as np

import devise  # noqa: F401  (sets the Keras backend)
from devise.evaluation.benchmark import _calibration_holdout
from devise.data.datasets import load_dataset, validation_split, zero_shot_split
from devise.evaluation.evaluate import relabel
from devise.data.features import extract_features
from devise.evaluation.metrics import flat_hit_at_k
from devise.models.presets import recipe_settings
from devise.training.train import train
from devise.labels.vectors import load_vectors, unit_rows
from devise.labels.wordnet import load_wordnet

SETTINGS = {
    "hinge": {k: v for k, v in recipe_settings("devise_hinge_mlp").items() if k != "method"},
    # one head, patience 8: the setting of the README's label-text table (the recipe now averages 5 heads)
    "softmax": {k: v for k, v in recipe_settings("devise_softmax_mlp").items()
                if k not in ("method", "ensemble", "patience")},
}
CANDIDATES = ["name@hinge", "gloss@hinge", "hyper@hinge", "name+gloss@hinge", "name+hyper@hinge",
              "name+gloss+hyper@hinge", "name@softmax", "gloss@softmax", "hyper@softmax", "combo@softmax",
              "name+gloss@softmax", "name+gloss+hyper@softmax"]


def class_texts(dataset, wordnet, rule: str) -> list[str]:
    out = []
    for name, wnid in zip(dataset.classes, dataset.wnids):
        if rule == "name" or wnid is None:
            out.append(name)
        elif rule == "gloss":
            out.append(f"{name}: {wordnet.gloss(wnid).split(';')[0].strip()}")
        elif rule in ("hyper", "combo"):
            parents = wordnet.hypernyms(wnid)
            text = f"{name}, a kind of {wordnet.lemmas(parents[0])[0].replace('_', ' ')}" if parents else name
            out.append(text + (f": {wordnet.gloss(wnid).split(';')[0].strip()}" if rule == "combo" else ""))
        else:
            raise SystemExit(f"unknown label text rule {rule!r}")
    return out


def benchmark_inputs():
    """The emoji benchmark with its cached features: (dataset, features, valid, labels, wordnet, MiniLM)."""
    dataset = load_dataset("emoji")
    fs = extract_features(dataset, "efficientnet_lite0")  # the backbone its logged results were measured on
    features, valid = np.asarray(fs.features, np.float32), np.asarray(fs.valid)
    return dataset, features, valid, np.asarray(dataset.labels), load_wordnet(), load_vectors("minilm")


def main(candidates: list[str]) -> None:
    dataset, features, valid, labels, wordnet, encoder = benchmark_inputs()
    rows = []
    for candidate in candidates:
        rule, setting = candidate.split("@")
        vectors = unit_rows(sum(encoder.encode(class_texts(dataset, wordnet, r)) for r in rule.split("+")))
        scores = []
        for seed in (0, 1, 2):
            split = zero_shot_split(dataset, seed=seed)
            val = validation_split(split, seed=seed)
            pick = lambda idx: np.asarray([i for i in idx if valid[i]], np.int64)  # noqa: E731
            train_c, val_c = np.asarray(val.train_classes), np.asarray(val.val_classes)
            held_style = _calibration_holdout(dataset, pick(val.train), seed, styles=("noto",))
            fit = np.setdiff1d(pick(val.train), held_style)
            val_images = pick(val.val)
            names = lambda classes: [dataset.classes[c] for c in classes]  # noqa: E731
            run = train("devise", features[fit], relabel(labels[fit], train_c), names(train_c), vectors[train_c],
                        val=(features[val_images], relabel(labels[val_images], val_c), vectors[val_c], names(val_c)),
                        seed=seed, verbose=0, **SETTINGS[setting])
            zsl = flat_hit_at_k(run.embed(features[val_images]) @ vectors[val_c].T,
                                relabel(labels[val_images], val_c), (1, 5))
            seen = flat_hit_at_k(run.embed(features[held_style]) @ vectors[train_c].T,
                                 relabel(labels[held_style], train_c), (1, 5))
            scores.append([zsl[1], zsl[5], seen[1], seen[5]])
        mean = np.mean(scores, axis=0)
        result = {"candidate": candidate, "val_zsl_hit@1": round(float(mean[0]), 3),
                  "val_zsl_hit@5": round(float(mean[1]), 3), "noto_seen_hit@1": round(float(mean[2]), 3),
                  "noto_seen_hit@5": round(float(mean[3]), 3)}
        print("RESULT " + json.dumps(result), flush=True)
        rows.append(result)
    print("| label text | loss | val zero-shot hit@1 | hit@5 | held-out style (seen) hit@1 | hit@5 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rule, setting = r["candidate"].split("@")
        print(f"| {rule} | {setting} | {100 * r['val_zsl_hit@1']:.1f} | {100 * r['val_zsl_hit@5']:.1f} | "
              f"{100 * r['noto_seen_hit@1']:.1f} | {100 * r['noto_seen_hit@5']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or CANDIDATES)
