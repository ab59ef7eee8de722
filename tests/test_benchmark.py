"""The main job end to end on a real subset of the emoji benchmark, and `devise train` + `devise evaluate`
on a real class-per-folder tree: real backbone features, GloVe, WordNet."""
import json
import os
import shutil

import numpy as np
import pytest

from devise.evaluation.benchmark import METHODS, run_benchmark
from devise.cli import main
from devise.data.datasets import ImageDataset, load_dataset

pytestmark = pytest.mark.slow  # ~1-2 min on 2 CPU cores (features of ~600 images, 7 methods fit twice)

N_CLASSES = 100


@pytest.fixture(scope="module")
def subset():
    """100 emoji classes in all their styles, as an ImageDataset (styles kept: the split holds one out)."""
    emoji = load_dataset("emoji")
    classes = np.sort(np.random.default_rng(0).choice(emoji.num_classes, N_CLASSES, replace=False))
    keep = np.flatnonzero(np.isin(emoji.labels, classes))
    position = np.full(emoji.num_classes, -1)
    position[classes] = np.arange(N_CLASSES)
    return ImageDataset(name="emoji-subset", root=emoji.root, paths=[emoji.paths[i] for i in keep],
                        labels=position[np.asarray(emoji.labels)[keep]].astype(np.int32),
                        classes=[emoji.classes[c] for c in classes], wnids=[emoji.wnids[c] for c in classes],
                        styles=np.asarray(emoji.styles)[keep], match=[emoji.match[c] for c in classes])


def test_benchmark_writes_the_report_and_the_metrics_schema(subset, tmp_path):
    report = run_benchmark(subset, seeds=[0], out_dir=tmp_path, log=lambda *a: None)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["benchmark"] == "emoji-subset" and saved["seeds"] == [0] and set(saved["methods"]) == set(METHODS)
    zsl_keys = {"hit@1", "hit@2", "hit@5", "hit@10", "per_class_top1", "hp@2", "hp@5", "hp@10", "hp@20"}
    for name, entry in saved["methods"].items():
        if name == "softmax":  # a closed-set classifier: seen classes only
            assert set(entry) == {"seen", "seen_std", "cost"}
            continue
        assert set(entry["zsl"]) == zsl_keys and set(entry["zsl_std"]) == zsl_keys
        assert set(entry["gzsl"]) == {"u", "s", "H"} and set(entry["gzsl_calibrated"]) == {"u", "s", "H", "gamma"}
        assert all(0 <= v <= 1 for v in entry["zsl"].values())
        assert entry["cost"]["seconds"] > 0  # what fitting and scoring the method took, per seed
        if name != "random_hinge_linear":  # the control's scores mean nothing: no confidence for it
            for group in ("confidence_seen", "confidence_zsl"):
                assert {"auroc", "fpr95", "aurc", "aurc_cosine", "ece", "ece_t1", "risk@0.5", "auroc_normalised"} \
                    <= set(entry[group])
                assert all(0 <= v <= 1 for v in entry[group].values()), entry[group]
            assert entry["confidence_fit"]["temperature"] > 0
            assert entry["confidence_fit"]["seen_temperature"] > 0  # fit on the held-out style
    n_unseen = round(0.25 * N_CLASSES)
    chance5 = 5 / n_unseen
    methods = report["methods"]
    # The vectors carry the knowledge: DeViSE beats chance clearly, the random control does not.
    assert methods["devise_hinge_mlp"]["zsl"]["hit@5"] > 1.5 * chance5
    assert methods["random_hinge_linear"]["zsl"]["hit@5"] < methods["devise_hinge_mlp"]["zsl"]["hit@5"]
    assert methods["softmax"]["seen"]["hit@1"] > 0.5
    text = (tmp_path / "report.md").read_text()
    assert "| devise_hinge_linear |" in text and "Generalized zero-shot" in text and "Confidence, unseen" in text
    assert "Seconds per seed to fit (both stages) and score each method: softmax " in text
    for plot in ("hit_at_k.png", "unseen_grid.png", "risk_coverage.png"):
        assert (tmp_path / plot).stat().st_size > 10_000


def test_train_then_evaluate_a_folder_tree_from_the_cli(subset, tmp_path, capsys):
    tree = tmp_path / "tree"
    for c in range(40):
        folder = tree / subset.classes[c].replace("/", " ")
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(subset.labels == c):
            shutil.copy(subset.paths[i], folder / f"{i}{os.path.splitext(subset.paths[i])[1]}")
    run = tmp_path / "run"
    # Holding classes out for zero-shot evaluation is asked for: a folder trains on all its classes unasked.
    assert main(["train", str(tree), "--method", "devise", "--head", "mlp", "--epochs", "5", "--holdout-unseen", "0.25",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "zsl" in printed and "| run |" in printed
    # the run records its temperature and threshold, fit on its own validation data
    confidence = json.loads((run / "settings.json").read_text())["confidence"]
    assert confidence["temperature"] > 0 and "validation" in confidence["fit_on"]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) == {"seen", "zsl", "gzsl"} and 0 <= result["zsl"]["hit@1"] <= 1


def _pixels(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGBA").resize((64, 64)), np.float32)


def test_the_calibration_style_has_no_twin_among_the_training_styles():
    """GZSL's gamma is chosen on the calibration style as the seen images: like the test style (twitter) it
    must have no near-duplicate among the styles trained on, or seen classes look easier than they are at
    test time (google and noto share their artwork: 'noto' made gamma too large)."""
    from devise.evaluation.benchmark import CALIBRATION_STYLES, _calibration_holdout
    emoji = load_dataset("emoji")
    styles, labels = np.asarray(emoji.styles), np.asarray(emoji.labels)
    held = _calibration_holdout(emoji, np.arange(len(emoji)), seed=0)
    assert len(held) and set(styles[held]) == set(CALIBRATION_STYLES)

    def nearest_other_style(i):  # mean abs pixel difference to the same class drawn in another style
        others = [j for j in np.flatnonzero(labels == labels[i]) if styles[j] not in (*CALIBRATION_STYLES, "twitter")]
        return min(np.abs(_pixels(emoji.paths[i]) - _pixels(emoji.paths[j])).mean() for j in others)

    sample = np.random.default_rng(0).choice(held, 20, replace=False)
    noto = [i for i in np.flatnonzero(styles == "noto") if labels[i] in set(labels[sample])]
    twin = np.median([min(np.abs(_pixels(emoji.paths[i]) - _pixels(emoji.paths[j])).mean()
                          for j in np.flatnonzero((labels == labels[i]) & (styles == "google"))) for i in noto])
    assert np.median([nearest_other_style(i) for i in sample]) > 3 * twin  # the noto/google twins as the yardstick
