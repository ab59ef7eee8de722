"""Confidence on the emoji benchmark from cached features: which background size (0 = plain MCM), chosen
on the VALIDATION classes, and the test measures of the benchmark's protocol (benchmark.run_seed).

Per seed and method, the stage-1 model (fit on the training classes) is scored on the validation images
against the validation classes for every background size in BACKGROUNDS (the temperature refit for each):
known vs unknown AUROC (the class removed), the 3-label known/unknown AUROC and how many 3-wrong-label
vocabularies answer "unknown" at the default threshold. Then the test measures of run_seed with
devise.confidence.BACKGROUND. Prints `RESULT name value` lines (means over seeds).

    METHODS=conse_imagenet1k,devise_hinge_mlp SEEDS=0,1,2 python benchmarks/confidence.py
    PRESETS=1 python benchmarks/confidence.py     # the ConSE presets' fits (presets.CONSE_CONFIDENCE)
    THROUGHPUT=1 python benchmarks/confidence.py  # predict's images/s with and without the probability
"""
from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np

import devise  # noqa: F401  (registers the emoji dataset)
from devise import benchmark, confidence, defaults, evaluate
from devise.datasets import load_dataset
from devise.features import extract_features
from devise.wordnet import load_wordnet

SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "0,1,2").split(","))
METHODS = os.environ.get("METHODS", "conse_imagenet1k,devise_hinge_mlp").split(",")
BACKGROUNDS = tuple(int(b) for b in os.environ.get("BACKGROUNDS", "0,100,300,1000,3000").split(","))
VAL_KEYS = ("auroc", "fpr95", "ece", "auroc_3labels", "kept_known_3labels", "unknown_rejected_3labels", "kept_known")


def main() -> None:
    started = time.perf_counter()
    dataset = load_dataset(defaults.BENCHMARK)
    fs = extract_features(dataset, defaults.TRAIN_BACKBONE)
    features = np.asarray(fs.features, np.float32)
    logits = np.asarray(fs.logits, np.float32)
    space = evaluate.label_space(dataset, defaults.VECTORS)
    usable = np.asarray(fs.valid) & space.has_vector[np.asarray(dataset.labels)]
    pool = confidence.background_pool(defaults.VECTORS)
    print(f"background pool: {len(pool)} WordNet nouns", flush=True)
    wordnet = load_wordnet()
    val_rows = defaultdict(list)  # (method, background, key) -> per seed
    test_rows = defaultdict(list)
    fitted = evaluate.validation_confidence

    def on_validation(model, features_, labels_, space_, *, val_classes, val_images, pool, logits=None, **kw):
        """benchmark.run_seed's confidence fit, also scored on validation for every background size."""
        images = np.asarray(val_images, np.int64)
        y = evaluate.relabel(labels_[images], np.asarray(val_classes))
        images, y = images[y >= 0], y[y >= 0]
        names, vectors, _ = space_.subset(val_classes)
        emb = model.encode_features(features_[images], None if logits is None else logits[images])
        matrix = evaluate.unit_vectors(model, vectors, names)
        for b in BACKGROUNDS:
            conf = confidence.fit_confidence(emb @ matrix.T, y, emb, pool, matrix, background=b)
            measures = evaluate.confidence_measures(emb, y, matrix, conf, pool)
            for key in VAL_KEYS:
                val_rows[(on_validation.method, b, key)].append(measures[key])
            val_rows[(on_validation.method, b, "temperature")].append(conf.temperature)
            val_rows[(on_validation.method, b, "threshold")].append(conf.min_confidence)
        return fitted(model, features_, labels_, space_, val_classes=val_classes, val_images=val_images,
                      pool=pool, logits=logits, **kw)

    benchmark.validation_confidence = on_validation
    for seed in SEEDS:
        for method in METHODS:
            on_validation.method = method
            results, _ = benchmark.run_seed(dataset, features, logits, usable, space, seed, [method], wordnet,
                                            defaults.VECTORS, {}, pool=pool)
            for group in ("confidence_zsl", "confidence_seen", "confidence_fit"):
                for key, value in results[method].get(group, {}).items():
                    test_rows[(method, group, key)].append(value)
            print(f"seed {seed} {method}: {time.perf_counter() - started:.0f} s", flush=True)
    print("\nvalidation classes (stage-1 models), mean over seeds:")
    for (method, b, key), values in sorted(val_rows.items()):
        print(f"RESULT val/{method}/background{b}/{key} {np.mean(values):.4f} +- {np.std(values):.4f}")
    print(f"\ntest (benchmark protocol, background {confidence.BACKGROUND}), mean over seeds {SEEDS}:")
    for (method, group, key), values in sorted(test_rows.items()):
        print(f"RESULT test/{method}/{group}/{key} {np.mean(values):.4f} +- {np.std(values):.4f}")
    print(f"RESULT seconds {time.perf_counter() - started:.0f}")



def preset_fits(backbone: str = "efficientnet_lite0", seed: int = 0, backgrounds=(100, 1000)) -> None:
    """The ConSE model presets' confidence (presets.CONSE_CONFIDENCE): fit on the benchmark's validation
    split of `seed` (validation-class images against the validation classes) on the preset's own backbone."""
    from devise.datasets import validation_split, zero_shot_split
    from devise.model import conse_model

    dataset = load_dataset(defaults.BENCHMARK)
    fs = extract_features(dataset, backbone)
    features, logits = np.asarray(fs.features, np.float32), np.asarray(fs.logits, np.float32)
    labels = np.asarray(dataset.labels)
    split = zero_shot_split(dataset, seed=seed)
    val = validation_split(split, seed=seed)
    for vectors in ("minilm", "glove-6b-50d"):
        space = evaluate.label_space(dataset, vectors)
        usable = np.asarray(fs.valid) & space.has_vector[labels]
        classes = np.asarray([c for c in val.val_classes if space.has_vector[c]])
        images = np.asarray([i for i in val.val if usable[i]])
        model = conse_model(backbone, vectors, 10)
        pool = confidence.background_pool(vectors)
        for b in backgrounds:
            confidence.BACKGROUND = b
            conf = evaluate.validation_confidence(model, features, labels, space, val_classes=classes,
                                                  val_images=images, pool=pool, logits=logits,
                                                  fit_on=f"emoji validation split, seed {seed}")
            y = evaluate.relabel(labels[images], classes)
            names, vecs, _ = space.subset(classes)
            emb = model.encode_features(features[images], logits[images])
            m = evaluate.confidence_measures(emb, y, evaluate.unit_vectors(model, vecs, names), conf, pool)
            print(f"PRESET {vectors} {conf.to_dict()}  val: " + ", ".join(
                f"{k} {m[k]:.3f}" for k in ("auroc", "ece", "kept_known_3labels", "unknown_rejected_3labels")), flush=True)


def throughput(repeats: int = 7, n_images: int = 64) -> None:
    """predict's cost of the probability: images -> ranked labels with and without it (the ConSE preset,
    the ImageNet-1K vocabulary, the background selected once as the server does), interleaved, medians."""
    from devise.confidence import background_pool, rank_with_probabilities, select_background
    from devise.images import load_images
    from devise.model import load
    from devise.ranking import rank_labels, score_labels
    from devise.vocabulary import load_vocabulary

    model = load("conse")
    dataset = load_dataset(defaults.BENCHMARK)
    images, _ = load_images(dataset.paths[:n_images], model.backbone.image_size)
    vocabulary = load_vocabulary("imagenet1k", model.vectors_spec)
    t0 = time.perf_counter()
    background = select_background(background_pool(model.vectors_spec), vocabulary.matrix, model.confidence.background)
    select_s = time.perf_counter() - t0
    model.encode_images(images)  # compile

    def cosine_only():
        embeddings = model.encode_images(images)
        return rank_labels(score_labels(embeddings, vocabulary), vocabulary, 5)

    def with_probability():
        return rank_with_probabilities(model, model.encode_images(images), vocabulary, 5, background=background)

    times = defaultdict(list)
    for _ in range(repeats):
        for name, fn in (("cosine", cosine_only), ("probability", with_probability)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = np.array(times["probability"]) / np.array(times["cosine"])
    print(f"RESULT predict_images_per_s_cosine {n_images / np.median(times['cosine']):.1f}")
    print(f"RESULT predict_images_per_s_probability {n_images / np.median(times['probability']):.1f}")
    print(f"RESULT probability_time_ratio_median {np.median(ratios):.3f} (min {ratios.min():.3f}, max {ratios.max():.3f})")
    print(f"RESULT background_selection_s_imagenet1k {select_s:.3f} (once per vocabulary)")


if __name__ == "__main__":
    mode = {"PRESETS": preset_fits, "THROUGHPUT": throughput}
    next((fn for key, fn in mode.items() if os.environ.get(key) == "1"), main)()
