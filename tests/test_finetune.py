"""End-to-end fine-tuning on real emoji images: only the top blocks move, the new run embeds with its own
backbone (in a fresh process too), its features get their own cache, augmentation is off at inference."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import devise  # noqa: F401
import keras
from devise import defaults
from devise.models.backbones import load_backbone, weighted_layers
from devise.errors import DeviseError
from devise.data.features import extract_features
from devise.training.finetune import end_to_end_model, finetune_run
from devise.models.model import load_model_folder
from devise.labels.vectors import GLOVE_SPEC

N_CLASSES = 40

pytestmark = pytest.mark.slow  # ~1-2 min on 2 CPU cores: features of ~240 images, one fine-tuning epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A DeViSE run trained on a 40-class emoji tree (real images, features, GloVe), then fine-tuned for
    one epoch on 64 of its training images at batch 8."""
    from devise.data.datasets import load_dataset
    from devise.training.train import class_label_vectors, train_dataset
    from devise.labels.vectors import load_vectors

    emoji = load_dataset("emoji")
    _, kept, _ = class_label_vectors(emoji, load_vectors(GLOVE_SPEC), drop_missing=True)
    simple = [c for c in np.flatnonzero(kept) if re.fullmatch(r"[a-z]+( [a-z]+)?", emoji.classes[c])]
    classes = np.random.default_rng(0).choice(simple, N_CLASSES, replace=False)
    root = tmp_path_factory.mktemp("finetune")
    tree = root / "tree"
    for c in classes:
        (tree / emoji.classes[c]).mkdir(parents=True)
        for i in np.flatnonzero(np.asarray(emoji.labels) == c):
            shutil.copy(emoji.paths[i], tree / emoji.classes[c] / f"{i}{os.path.splitext(emoji.paths[i])[1]}")
    train_dataset(str(tree), "devise", epochs=5, out_dir=root / "run", verbose=0, backbone=defaults.BACKBONE)

    steps = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            steps.append(time.perf_counter() - self.start)

    finetune_run(root / "run", root / "ft", epochs=1, batch_size=8, max_images=64, verbose=0,
                 callbacks=[StepTimer()])
    # The first step includes compilation; the rest are the steady-state cost.
    print(f"\nfine-tuning on CPU, batch 8: {np.median(steps[1:]):.2f} s/step (first step {steps[0]:.1f} s)")
    paths = sorted(str(p) for p in tree.rglob("*.*"))
    return {"root": root, "run": root / "run", "ft": root / "ft", "paths": paths, "steps": steps}


def test_only_the_top_blocks_change(runs):
    assert len(runs["steps"]) == 8                                # 64 images at batch 8
    settings = json.loads((runs["ft"] / "settings.json").read_text())
    assert settings["finetune"]["blocks"] == ["blocks_15", "head"] and settings["finetune"]["images"] == 64
    pretrained = {layer.name: layer.get_weights() for layer in weighted_layers(load_backbone().features_model)}
    tuned = load_model_folder(runs["ft"]).backbone
    changed = set()
    for layer in weighted_layers(tuned.features_model):
        before, after = pretrained[layer.name], layer.get_weights()
        if any(not np.array_equal(a, b) for a, b in zip(before, after)):
            changed.add(layer.name)
    assert changed == {"blocks_15_expand", "blocks_15_depthwise", "blocks_15_project", "head"}
    # the head trained on too, and the pretrained backbone of this process was left untouched
    old_head = load_model_folder(runs["run"]).model.get_weights()
    new_head = load_model_folder(runs["ft"]).model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(old_head, new_head))
    assert not np.array_equal(load_backbone().features_model.get_layer("head").get_weights()[0],
                              tuned.features_model.get_layer("head").get_weights()[0])


def test_fresh_process_embeds_with_the_finetuned_backbone(runs):
    out = runs["root"] / "embeddings.npz"
    code = f"""
        import numpy as np, devise
        from devise.models.model import load
        paths = {runs["paths"][:6]!r}
        tuned, original = load({str(runs["ft"])!r}), load({str(runs["run"])!r})
        assert "finetuned" in tuned.backbone.cache_key and "finetuned" not in original.backbone.cache_key
        np.savez({str(out)!r}, tuned=tuned.encode_paths(paths)[0], original=original.encode_paths(paths)[0])
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as data:
        tuned, original = data["tuned"], data["original"]
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1, rtol=1e-5)
    assert np.abs(tuned - original).max() > 1e-3
    # the same embeddings as this process computes from the fine-tuned backbone's features
    features = extract_features(runs["paths"][:6], load_model_folder(runs["ft"]).backbone, progress=False).features
    np.testing.assert_allclose(load_model_folder(runs["ft"]).embed(np.asarray(features)), tuned, atol=1e-4)


def test_finetuned_features_have_their_own_cache(runs):
    paths = runs["paths"][:8]
    pretrained = extract_features(paths, defaults.BACKBONE, progress=False)
    tuned = extract_features(paths, load_model_folder(runs["ft"]).backbone, progress=False)
    assert tuned.folder != pretrained.folder and tuned.logits is None
    assert np.abs(np.asarray(tuned.features) - np.asarray(pretrained.features)).max() > 1e-3


def test_augmentation_only_while_training(runs):
    from devise.data.features import build_image_store

    images = np.asarray(build_image_store(runs["paths"][:8], 224, progress=False)[0])
    backbone = load_model_folder(runs["ft"]).backbone
    head = load_model_folder(runs["ft"]).model
    model = end_to_end_model(backbone.features_model, head, seed=3)
    first, second = model.predict(images, verbose=0), model.predict(images, verbose=0)
    np.testing.assert_array_equal(first, second)
    direct = head.predict(backbone.features_model.predict(images, verbose=0), verbose=0)
    np.testing.assert_allclose(first, direct, rtol=1e-5, atol=1e-5)   # the augmentation is the identity
    trained = np.asarray(model(images, training=True))
    assert np.abs(trained - first).max() > 1e-3                       # ...and active while training


def test_bad_inputs(runs, tmp_path):
    from devise.cli import main

    with pytest.raises(DeviseError, match="already exists"):
        finetune_run(runs["run"], runs["ft"])
    with pytest.raises(DeviseError, match="blocks must be between 1 and 18"):
        finetune_run(runs["run"], tmp_path / "x", blocks=40, max_images=8, verbose=0)
    with pytest.raises(DeviseError, match="not a finished training run"):
        finetune_run(tmp_path, tmp_path / "y")
    assert main(["finetune", str(runs["run"]), "--out", str(runs["ft"])]) != 0
    assert not (tmp_path / "x").exists()


def test_resumes_after_sigkill(runs, tmp_path):
    """Killed after its first epoch's checkpoint, the same call resumes there and ends where an
    uninterrupted fine-tuning ends (weights, augmentation and loss random state, optimizer restored)."""
    kwargs = dict(epochs=3, batch_size=8, max_images=24, verbose=0)
    whole = finetune_run(runs["run"], tmp_path / "whole", **kwargs)
    call = (f"from devise.training.finetune import finetune_run; "
            f"finetune_run({str(runs['run'])!r}, {str(tmp_path / 'resumed')!r}, **{kwargs!r})")
    proc = subprocess.Popen([sys.executable, "-c", call], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "resumed.partial" / "checkpoint.npz"
    deadline = time.time() + 600
    while not checkpoint.exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert checkpoint.exists() and not (tmp_path / "resumed").exists()
    with pytest.raises(DeviseError, match=r"other options \(epochs\)"):
        finetune_run(runs["run"], tmp_path / "resumed", **{**kwargs, "epochs": 4})
    again = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the fine-tuning" in again.stdout and "after epoch 1" in again.stdout
    assert not checkpoint.parent.exists()
    resumed = load_model_folder(tmp_path / "resumed")
    assert len(resumed.history["finetune_loss"]) == 3
    np.testing.assert_allclose(resumed.history["finetune_loss"], whole.history["finetune_loss"], rtol=1e-4)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with np.load(tmp_path / "resumed" / "backbone.weights.npz") as r, np.load(tmp_path / "whole" / "backbone.weights.npz") as w:
        for key in ("head/0", "blocks_15_project/0"):
            np.testing.assert_allclose(r[key], w[key], rtol=1e-4, atol=1e-5)


def test_a_run_on_a_side_by_side_backbone_is_refused_with_one_line(runs, tmp_path):
    """The default training backbone joins two networks whose layers share names: fine-tuning it would mix
    their blocks, so it is refused before anything is built."""
    from devise.training.train import train_dataset

    tree = runs["root"] / "tree"
    train_dataset(str(tree), "devise", epochs=1, out_dir=tmp_path / "run", verbose=0)  # defaults.TRAIN_BACKBONE
    assert load_model_folder(tmp_path / "run").settings["backbone"] == defaults.TRAIN_BACKBONE == "efficientnet_lite0_lite2"
    with pytest.raises(DeviseError, match="joins efficientnet_lite0 and efficientnet_lite2; fine-tuning takes one backbone"):
        finetune_run(tmp_path / "run", tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
