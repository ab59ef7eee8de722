"""Calibrated probabilities and "unknown": the metric functions on hand-computed cases, then the real
ConSE preset (packaged backbone, MiniLM, WordNet background) on real photos and the CLI."""
import json

import numpy as np
import pytest
from PIL import Image

from devise.evaluation import confidence, metrics
from devise.errors import DeviseError
from devise.models.model import load


# ---------------------------------------------------------------- metrics, by hand

def test_auroc_and_fpr_at_tpr_by_hand():
    assert metrics.auroc([3, 2], [1, 0]) == 1.0
    assert metrics.auroc([0, 1], [2, 3]) == 0.0
    assert metrics.auroc([1], [1]) == 0.5  # a tie counts one half
    assert metrics.auroc([0.9, 0.4], [0.5, 0.1]) == 0.75  # 3 of the 4 pairs ordered right
    # 100 known scores 0.00..0.99: 95% of them are >= 0.05; of the unknown 0.5, 0.01, 0.06 two pass
    assert metrics.fpr_at_tpr(np.arange(100) / 100, [0.5, 0.01, 0.06]) == pytest.approx(2 / 3)
    with pytest.raises(DeviseError):
        metrics.auroc([], [1])


def test_risk_coverage_aurc_and_ece_by_hand():
    coverage, risk = metrics.risk_coverage([0.9, 0.7, 0.8], [True, True, False])
    np.testing.assert_allclose(coverage, [1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3])  # kept by confidence: 0.9 right, 0.8 wrong, 0.7 right
    assert metrics.aurc([0.9, 0.7, 0.8], [True, True, False]) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    # bin (0.8, 0.9]: confidence 0.9 twice, one right (gap 0.4 each); bin (0, 0.1]: 0.1 twice, none right
    assert metrics.expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0], bins=10) == pytest.approx(0.25)
    assert metrics.expected_calibration_error([0.75, 0.75, 0.75, 0.75], [1, 1, 1, 0]) == pytest.approx(0.0)


def test_probabilities_background_and_threshold_by_hand():
    scores = np.array([[0.5, 0.3, 0.1]])
    p = confidence.probabilities(scores, 0.1)
    np.testing.assert_allclose(p, np.exp([[5, 3, 1]]) / np.exp([5, 3, 1]).sum())
    # a background label at 0.5 takes half of what the best label had alone
    with_background = confidence.probabilities(scores, 0.1, np.array([[0.5]]))
    assert with_background[0, 0] == pytest.approx(np.exp(5) / (np.exp([5, 3, 1]).sum() + np.exp(5)))
    assert with_background.sum() < 1
    assert confidence.choose_threshold(np.arange(1, 101) / 100, keep=0.95) == pytest.approx(0.06)
    pool = np.eye(4, dtype=np.float32)
    labels = np.array([[1, 0, 0, 0], [0, 0.6, 0.8, 0]], np.float32)
    # the pool row equal to a label is a duplicate, never background; the farthest come first
    np.testing.assert_array_equal(confidence.select_background(pool, labels, 2), pool[[1, 3]])


def test_seen_temperature_by_hand():
    conf = confidence.Confidence(temperature=0.1, seen_temperature=0.05)
    # training classes (by name) take the seen temperature, new labels the other; none seen: one scalar
    np.testing.assert_allclose(conf.label_temperatures(["cat", "tiger", "dog"], ["dog", "cat"]), [0.05, 0.1, 0.05])
    assert conf.label_temperatures(["tiger"], ["dog"]) == 0.1
    assert confidence.Confidence(temperature=0.1).label_temperatures(["dog"], ["dog"]) == 0.1
    # per-label logits: 0.5/0.05 and 0.3/0.1, the background 0.5 at its own temperature 0.1
    p = confidence.probabilities(np.array([[0.5, 0.3]]), np.array([0.05, 0.1]), np.array([[0.5]]), 0.1)
    assert p[0, 0] == pytest.approx(np.exp(10) / (np.exp(10) + np.exp(3) + np.exp(5)))
    with pytest.raises(DeviseError):
        confidence.probabilities(np.array([[0.5, 0.3]]), np.array([0.05, 0.1]), np.array([[0.5]]))
    # images whose class is always clearly first: the seen fit is sharper than the background's T
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.3, (200, 10))
    true = rng.integers(0, 10, 200)
    scores[np.arange(200), true] = 0.6
    embeddings = np.eye(12, dtype=np.float32)[rng.integers(0, 12, 200)]
    pool, labels = np.eye(12, dtype=np.float32), np.zeros((10, 12), np.float32)
    fitted = confidence.fit_seen_temperature(confidence.Confidence(temperature=0.1, background=2), scores, true,
                                             embeddings, pool, labels, fit_on="held out")
    assert fitted.seen_temperature < 0.1 and fitted.temperature == 0.1 and fitted.seen_fit_on == "held out"
    assert confidence.Confidence.from_dict(fitted.to_dict()) == fitted


# ---------------------------------------------------------------- the real model on real photos

@pytest.fixture(scope="module")
def model():
    return load("conse")


@pytest.fixture(scope="module")
def chelsea(model):
    import skimage.data

    from devise.data.images import to_rgb_array

    return to_rgb_array(Image.fromarray(skimage.data.chelsea()), model.backbone.image_size)[None]


def test_a_cat_against_three_wrong_labels_is_unknown_and_against_cat_is_cat(model, chelsea):
    [wrong] = model.predict(chelsea, labels=["car", "piano", "bridge"], top=3)
    assert wrong[0]["label"] == "unknown" and [p["label"] for p in wrong[1:]][0] == "car"  # nearest still listed
    assert all(p["probability"] < model.confidence.min_confidence for p in wrong[1:])
    [right] = model.predict(chelsea, labels=["cat", "car", "piano"], top=3)
    assert right[0]["label"] == "cat" and right[0]["probability"] > 0.5
    assert right[0]["score"] == pytest.approx(float((model.encode_images(chelsea) @ model.encode_labels(["cat"]).T)[0, 0]),
                                              abs=1e-4)
    # min_confidence=0 always names a label; 1 never does
    assert model.predict(chelsea, labels=["car", "piano", "bridge"], min_confidence=0)[0][0]["label"] == "car"
    assert model.predict(chelsea, labels=["cat", "car"], min_confidence=1)[0][0]["label"] == "unknown"
    with pytest.raises(DeviseError, match="min_confidence"):
        model.predict(chelsea, labels=["cat"], min_confidence=1.5)


def test_the_fitted_temperature_lowers_the_nll_on_real_photos(model, foolbox_photos):
    """ImageNet photos against the names of their ImageNet classes (foolbox's label in the file name)."""
    from devise.assets import imagenet1k_classes

    classes = imagenet1k_classes()
    wanted = sorted({int(p.stem.split("_")[-1]) for p in foolbox_photos})
    names = [classes[i]["name"] for i in wanted]
    true = np.array([wanted.index(int(p.stem.split("_")[-1])) for p in foolbox_photos])
    embeddings = model.encode_images(foolbox_photos)
    scores = embeddings @ model.encode_labels(names).T
    fitted = confidence.fit_temperature(scores, true)
    assert confidence.nll(scores, true, fitted) < min(confidence.nll(scores, true, t) for t in (1.0, 0.3, 0.01))
    assert confidence.nll(scores, true, fitted) <= confidence.nll(scores, true, fitted * 1.2)
    # the preset's temperature was fit on the emoji benchmark's validation split and says so
    assert "validation" in model.confidence.fit_on and model.confidence.temperature > 0


def test_cli_prints_the_probability_and_the_answer(tmp_path, capsys):
    import skimage.data

    from devise.cli import main

    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(photo, quality=95)
    labels = tmp_path / "labels.txt"
    labels.write_text("car\npiano\nbridge\n")
    assert main(["predict", str(photo), "--vocab", str(labels), "--json", "--top", "2"]) == 0
    [result] = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert result["answer"] == "unknown" and [p["label"] for p in result["predictions"]][0] == "car"
    assert all(0 <= p["probability"] < result["min_confidence"] for p in result["predictions"])
    assert main(["predict", str(photo), "--vocab", str(labels), "--min-confidence", "0"]) == 0
    text = capsys.readouterr().out
    assert "answer: car" in text and "%" in text
    assert main(["predict", str(photo), "--vocab", str(labels), "--min-confidence", "2"]) == 2
    assert "min_confidence must be a probability" in capsys.readouterr().err


def test_a_fit_on_held_out_images_of_the_training_classes_is_a_seen_fit():
    """store_confidence on held-out images of a run's own classes (a run validated by image) records its
    fit as the seen-class temperature too; real emoji images, backbone, MiniLM, a briefly trained head."""
    from devise.data.datasets import load_dataset
    from devise.data.features import extract_features
    from devise.training.train import class_label_vectors, train
    from devise.labels.vectors import load_vectors

    emoji = load_dataset("emoji")
    classes = np.arange(12)
    keep = np.flatnonzero(np.isin(emoji.labels, classes))
    labels = np.asarray(emoji.labels)[keep]
    held = np.isin(np.asarray(emoji.styles)[keep], ("openmoji", "twitter", "google"))
    features = np.asarray(extract_features([emoji.paths[i] for i in keep]).features, np.float32)
    matrix, _, _ = class_label_vectors(emoji, load_vectors("minilm"))
    names = [emoji.classes[c] for c in classes]
    run = train("devise", features[~held], labels[~held], names, matrix[classes], epochs=3, verbose=0,
                vectors_spec="minilm")
    assert held.sum() >= confidence.MIN_FIT_IMAGES
    conf = confidence.store_confidence(run, run, features[held], labels[held], matrix[classes], names)
    assert conf.seen_temperature == conf.temperature > 0 and conf.seen_fit_on == conf.fit_on
    assert run.confidence == conf
    np.testing.assert_allclose(conf.label_temperatures([names[0], "a new label"], run.class_names),
                               [conf.seen_temperature, conf.temperature])
