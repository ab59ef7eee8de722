"""A user's small folder trains on all its classes, validates as its size allows, and never reports a
metric that cannot fail; every option an error message suggests exists and works (the real CLI, piped).

Trees are real emoji images copied from the benchmark (one sub-folder per class, its styles as images).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import devise  # noqa: F401
from devise.assets import data_home
from devise.data.datasets import ImageDataset, load_dataset, validation_split, zero_shot_split
from devise.training.train import MIN_SEEN_VAL_IMAGES, MIN_ZERO_SHOT_VAL_CLASSES, choose_validation
from devise.labels.vectors import GLOVE_SPEC

ANIMALS = ["cat", "dog", "horse", "pig", "cow", "rabbit", "mouse"]
NONSENSE = "zqxjvk wbfq"  # a class name no word-vector file has
GLOVE = ("--vectors", GLOVE_SPEC)  # labels without a vector exist only in word-vector spaces


def emoji_tree(root: Path, names) -> Path:
    """A class-per-folder tree of the benchmark's images of these emoji names (one image per style)."""
    home = data_home() / "emoji"
    by_name = {c["name"]: c for c in json.loads((home / "classes.json").read_text())}
    for name in names:
        (root / name).mkdir(parents=True)
        source = by_name.get(name, by_name["cat"])  # the nonsense class borrows real images
        for style in source["styles"]:
            image = home / "images" / style / f"{source['codepoint']}.png"
            if image.is_file():
                shutil.copy(image, root / name / f"{style}.png")
    return root


def devise_cli(*args, cwd=None, timeout=600):
    """The real CLI with stdout and stderr piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "devise.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "KERAS_BACKEND": "jax"})


def reported_ks(text: str) -> list[int]:
    return [int(k) for k in re.findall(r"hit@(\d+)", text)]


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    root = tmp_path_factory.mktemp("seven")
    tree = emoji_tree(root / "animals", ANIMALS)
    result = devise_cli("train", tree, "--out", root / "run", "--epochs", "3")
    return {"root": root, "tree": tree, "run": root / "run", "result": result}


def test_seven_classes_all_trained(seven):
    result = seven["result"]
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(seven["run"] / "labels.npz") as labels:
        assert sorted(labels["class_names"].tolist()) == sorted(ANIMALS)
    settings = json.loads((seven["run"] / "settings.json").read_text())
    assert settings["unseen_fraction"] == 0 and settings["unseen_classes"] == [] and len(settings["train_classes"]) == 7
    # the log names the validation mode and why (7 classes x 6 images: too few for either validation)
    assert "validation: none, a fixed number of epochs" in result.stdout
    assert "needs at least 20 validation classes, 1 possible" in result.stdout
    assert "classes: all 7 trained" in result.stdout
    assert all(k < 7 for k in reported_ks(result.stdout + result.stderr)), result.stdout
    # piped output: no colour codes, no backspace redraws from Keras' progress bar
    assert "\x1b[" not in result.stdout + result.stderr and "\x08" not in result.stdout


def test_evaluate_all_classes_run_reports_seen_only(seven):
    result = devise_cli("evaluate", seven["run"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no unseen classes to score zero-shot" in result.stdout and "zsl" not in result.stdout
    assert "hit@1" in result.stdout and reported_ks(result.stdout) and max(reported_ks(result.stdout)) < 7


def test_preset_sets_the_recipe_and_flags_win(seven):
    """`devise train --preset NAME` trains a benchmark recipe; a flag given explicitly overrides it."""
    out = seven["root"] / "preset-run"
    result = devise_cli("train", seven["tree"], "--preset", "devise_hinge_mlp", "--head", "linear",
                        "--epochs", "2", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["preset"] == "devise_hinge_mlp" and settings["method"] == "devise" and settings["loss"] == "hinge"
    assert settings["margin"] == 0.3 and settings["truncated"] is False and settings["normalize_output"] is True
    assert settings["head"] == "linear"  # the flag, not the recipe's mlp
    failed = devise_cli("train", seven["tree"], "--preset", "conse", "--out", seven["root"] / "x")
    assert failed.returncode == 2 and "invalid choice" in failed.stderr  # a model preset is not a recipe


def test_three_classes_learn_and_hints_work(tmp_path):
    """3 real classes and one with no vector: the error's --drop-missing hint trains on the 3 (this
    crashed with an IndexError), the loss is never exactly 0, no hit@k with k >= 3 is printed."""
    tree = emoji_tree(tmp_path / "three", ANIMALS[:3] + [NONSENSE])
    failed = devise_cli("train", tree, "--out", tmp_path / "run0", "--epochs", "3", *GLOVE)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.count("\n") == 1 and "--drop-missing" in failed.stderr and NONSENSE in failed.stderr
    result = devise_cli("train", tree, "--out", tmp_path / "run", "--epochs", "3", "--drop-missing", *GLOVE)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "run" / "labels.npz") as labels:
        assert sorted(labels["class_names"].tolist()) == sorted(ANIMALS[:3])
    losses = [float(v) for v in re.findall(r"loss: ([0-9.e+-]+)", result.stdout)]
    assert len(losses) == 3 and all(v > 0 for v in losses), result.stdout
    assert all(k < 3 for k in reported_ks(result.stdout + result.stderr)), result.stdout
    assert "validation: none" in result.stdout


def test_one_class_is_a_one_line_error(tmp_path):
    tree = emoji_tree(tmp_path / "one", ["cat"])
    result = devise_cli("train", tree, "--out", tmp_path / "run")
    assert result.returncode == 2 and result.stdout.count("\n") <= 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "training needs at least 2 classes" in lines[0], result.stderr


def _toy(n_classes, per_class):
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int32)
    return ImageDataset(name="toy", root="/toy", paths=[f"/toy/{i}.png" for i in range(len(labels))],
                        labels=labels, classes=[f"c{i}" for i in range(n_classes)], wnids=[None] * n_classes)


@pytest.mark.parametrize("n_classes, per_class, mode", [(7, 6, "none"), (7, 30, "seen"), (130, 5, "zero-shot")])
def test_validation_mode_follows_the_data(n_classes, per_class, mode):
    ds = _toy(n_classes, per_class)
    split = zero_shot_split(ds, seed=0, unseen_fraction=0)
    kept, usable = np.ones(n_classes, bool), np.ones(len(ds), bool)
    chosen, val, why = choose_validation(split, kept, usable, seed=0)
    assert chosen == mode, why
    if mode == "seen":  # every class keeps training images; validation images are of the same classes
        assert set(ds.labels[val.val]) == set(ds.labels[val.train]) == set(range(n_classes))
        assert len(val.val) >= MIN_SEEN_VAL_IMAGES and not set(val.val) & set(split.seen_test)
    if mode == "zero-shot":
        assert len(val.val_classes) >= MIN_ZERO_SHOT_VAL_CLASSES


def test_emoji_keeps_its_benchmark_split():
    """`devise train emoji` still holds 25% of the classes out and validates zero-shot, as before."""
    from devise.data.datasets import default_holdout_unseen

    ds = load_dataset("emoji")
    split = zero_shot_split(ds, seed=0, unseen_fraction=default_holdout_unseen("emoji"))
    assert np.array_equal(split.unseen_classes, zero_shot_split(ds, seed=0).unseen_classes)
    kept, usable = np.ones(ds.num_classes, bool), np.ones(len(ds), bool)
    mode, val, _ = choose_validation(split, kept, usable, seed=0)
    assert mode == "zero-shot" and np.array_equal(val.val_classes, validation_split(split, seed=0).val_classes)


# ---------------------------------------------------------------- hints: follow each one, it works

def _photo(tmp_path, foolbox_photos):
    image = tmp_path / "photo.jpg"
    shutil.copy(foolbox_photos[0], image)
    return image


def test_predict_hint_drop_missing(tmp_path, foolbox_photos):
    vocab = tmp_path / "labels.txt"
    vocab.write_text(f"cat\ndog\n{NONSENSE}\n")
    image = _photo(tmp_path, foolbox_photos)
    failed = devise_cli("predict", image, "--vocab", vocab, "--json", *GLOVE)
    assert failed.returncode == 2 and "--drop-missing" in failed.stderr and NONSENSE in failed.stderr
    result = devise_cli("predict", image, "--vocab", vocab, "--json", "--drop-missing", *GLOVE)
    assert result.returncode == 0, result.stderr[-2000:]
    labels = [p["label"] for p in json.loads(result.stdout.strip().splitlines()[-1])["predictions"]]
    assert sorted(labels) == ["cat", "dog"]
    assert NONSENSE in result.stderr  # the dropped label is reported
    # the cached vocabulary without the dropped label does not hide the error next time
    again = devise_cli("predict", image, "--vocab", vocab, "--json", *GLOVE)
    assert again.returncode == 2 and "--drop-missing" in again.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_hint_drop_missing(tmp_path):
    vocab = tmp_path / "labels.txt"
    vocab.write_text(f"cat\n{NONSENSE}\n")
    failed = devise_cli("serve", "--vocab", vocab, "--port", _free_port(), *GLOVE)
    assert failed.returncode == 2 and "--drop-missing" in failed.stderr
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "devise.cli", "serve", "--vocab", str(vocab), "--drop-missing", *GLOVE,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "KERAS_BACKEND": "jax"})
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
                    info = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.time() < deadline
                time.sleep(1)
        assert info["labels"] == 1 and info["vocab"] == "labels.txt"
    finally:
        server.terminate()
        server.wait(30)


def test_search_hint_make_an_index(tmp_path, foolbox_photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder, foolbox_photos)
    failed = devise_cli("search", tmp_path / "photos.index", "cat")
    assert failed.returncode == 2
    hint = re.search(r"'devise (index [^']+)'", failed.stderr).group(1).replace("FOLDER", str(folder)).split()
    assert devise_cli(*hint).returncode == 0
    result = devise_cli("search", tmp_path / "photos.index", "cat", "--json")
    assert result.returncode == 0 and len(json.loads(result.stdout)["results"]) == 1


def test_search_hint_text_or_image(tmp_path):
    failed = devise_cli("search", tmp_path / "none.index")
    assert failed.returncode == 2 and "--image PATH" in failed.stderr
    assert "--image" in devise_cli("search", "--help").stdout
