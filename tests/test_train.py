"""Training on real cached features of an emoji subset: every method learns, runs reload and resume."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import devise  # noqa: F401
from devise.errors import DeviseError
from devise.evaluation.metrics import flat_hit_at_k
from devise.models.model import load, random_label_vectors
from devise.training.train import train
from devise.labels.vectors import GLOVE_SPEC


def hit_at_k(scores, labels, k):
    return flat_hit_at_k(scores, labels, (k,))[k]

N_CLASSES, N_UNSEEN = 60, 15


@pytest.fixture(scope="module")
def emoji_subset():
    """60 seeded emoji classes, all styles: real EfficientNet-Lite0 features and GloVe vectors.

    seen classes train on every style but twitter (held out as the seen test); 15 classes are unseen.
    """
    from devise.data.datasets import load_dataset
    from devise.data.features import extract_features
    from devise.training.train import class_label_vectors
    from devise.labels.vectors import load_vectors

    dataset = load_dataset("emoji")
    vectors, kept, _ = class_label_vectors(dataset, load_vectors(GLOVE_SPEC), drop_missing=True)
    rng = np.random.default_rng(0)
    classes = np.sort(rng.choice(np.flatnonzero(kept), N_CLASSES, replace=False))
    images = np.flatnonzero(np.isin(dataset.labels, classes))
    features = np.asarray(extract_features([dataset.paths[i] for i in images], "efficientnet_lite0", progress=False).features)
    labels = np.searchsorted(classes, dataset.labels[images])
    styles = np.asarray(dataset.styles)[images]
    names = [dataset.classes[c] for c in classes]
    unseen = np.zeros(N_CLASSES, bool)
    unseen[rng.choice(N_CLASSES, N_UNSEEN, replace=False)] = True
    seen_ids, unseen_ids = np.flatnonzero(~unseen), np.flatnonzero(unseen)

    def part(mask, class_ids):
        remap = np.full(N_CLASSES, -1)
        remap[class_ids] = np.arange(len(class_ids))
        return features[mask], remap[labels[mask]]

    return {
        "train": part(~unseen[labels] & (styles != "twitter"), seen_ids),
        "seen_test": part(~unseen[labels] & (styles == "twitter"), seen_ids),
        "unseen": part(unseen[labels], unseen_ids),
        "seen_names": [names[c] for c in seen_ids], "unseen_names": [names[c] for c in unseen_ids],
        "seen_vectors": vectors[classes[seen_ids]], "unseen_vectors": vectors[classes[unseen_ids]],
    }


def _fit(data, method, **kwargs):
    x, y = data["train"]
    options = dict(epochs=25, verbose=0, seed=0)
    options.update(kwargs)
    return train(method, x, y, data["seen_names"], data["seen_vectors"], **options)


@pytest.mark.parametrize("method, options", [
    ("softmax", {}), ("conse", {}), ("devise", {}), ("devise", {"loss": "cosine", "head": "mlp"}),
    ("devise", {"truncated": False}), ("random", {}),
])
def test_each_method_beats_chance(emoji_subset, method, options):
    data = emoji_subset
    run = _fit(data, method, **options)
    seen_x, seen_y = data["seen_test"]
    n_seen = len(data["seen_names"])
    if method in ("softmax", "conse"):
        seen_scores = run.predict_proba(seen_x)
    else:
        seen_scores = run.predict_scores(seen_x, data["seen_vectors"], data["seen_names"])
    # seen classes in an unseen style: 45 classes, chance hit@1 = 2%; measured .47-.89
    assert hit_at_k(seen_scores, seen_y, 1) > 10 / n_seen
    unseen_x, unseen_y = data["unseen"]
    zero_shot = hit_at_k(run.predict_scores(unseen_x, data["unseen_vectors"], data["unseen_names"]), unseen_y, 1)
    # chance is 1/15; measured here: softmax/ConSE .20, DeViSE .14-.17, random .03
    if method == "random":
        assert zero_shot < 1.7 / N_UNSEEN        # the control: random label vectors carry no meaning
    else:
        assert zero_shot > 1.7 / N_UNSEEN


def test_random_control_vectors():
    a = random_label_vectors(["cat", "dog"], 50, seed=1)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(a[1], random_label_vectors(["dog"], 50, seed=1)[0])   # by name
    assert not np.allclose(a, random_label_vectors(["cat", "dog"], 50, seed=2))


def test_early_stopping_restores_best(emoji_subset, tmp_path):
    data = emoji_subset
    val = (*data["unseen"], data["unseen_vectors"], data["unseen_names"])   # zero-shot validation classes
    run = _fit(data, "devise", val=val, epochs=60, patience=3, out_dir=tmp_path / "run")
    history = run.history
    assert history["epochs_run"] < 60 and history["epochs_run"] - history["best_epoch"] == 3
    best = history["best_val_hit@5"]
    assert best == max(history["val_hit@5"])
    scores = run.predict_scores(val[0], val[2])
    assert hit_at_k(scores, val[1], 5) == pytest.approx(best)                   # the best weights are back
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["best_epoch"] == history["best_epoch"]
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["method"] == "devise" and settings["loss"] == "hinge" and settings["val_zero_shot"]
    with pytest.raises(DeviseError, match="already holds this finished run"):
        _fit(data, "devise", val=val, epochs=60, patience=3, out_dir=tmp_path / "run")
    with pytest.raises(DeviseError, match="other settings"):
        _fit(data, "devise", val=val, epochs=61, patience=3, out_dir=tmp_path / "run")


def _dump(data, folder):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train_x.npy", data["train"][0])
    np.save(folder / "train_y.npy", data["train"][1])
    np.save(folder / "seen_v.npy", data["seen_vectors"])
    np.save(folder / "unseen_x.npy", data["unseen"][0])
    np.save(folder / "unseen_v.npy", data["unseen_vectors"])
    (folder / "names.json").write_text(json.dumps(data["seen_names"]))


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_saved_run_predicts_the_same_in_a_fresh_process(emoji_subset, tmp_path):
    data = emoji_subset
    _dump(data, tmp_path)
    for method in ("devise", "conse"):
        run = _fit(data, method, epochs=5, out_dir=tmp_path / method)
        expected = run.predict_scores(data["unseen"][0], data["unseen_vectors"])
        result = _python(f"""
            import numpy as np, devise
            from devise.models.model import load
            run = load({str(tmp_path / method)!r})
            np.save({str(tmp_path / (method + '_scores.npy'))!r},
                    run.predict_scores(np.load({str(tmp_path / 'unseen_x.npy')!r}), np.load({str(tmp_path / 'unseen_v.npy')!r})))
            print(run.method, run.settings["epochs"], len(run.class_names))
        """)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [method, "5", str(len(data["seen_names"]))]
        np.testing.assert_allclose(np.load(tmp_path / (method + "_scores.npy")), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(DeviseError, match="not a finished training run"):
        load(tmp_path)


RESUMABLE_TRAINING = """
    import json, os, signal, sys, numpy as np, keras, devise
    from devise.training.train import train
    d = sys.argv[1]
    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if os.environ.get("CRASH_AFTER") and epoch + 1 == int(os.environ["CRASH_AFTER"]):
                os.kill(os.getpid(), signal.SIGKILL)      # after the epoch's checkpoint was written
    run = train("devise", np.load(d + "/train_x.npy"), np.load(d + "/train_y.npy"),
                json.load(open(d + "/names.json")), np.load(d + "/seen_v.npy"), epochs=8, batch_size=64,
                seed=3, out_dir=sys.argv[2], callbacks=[Crash()], verbose=0)
    np.save(sys.argv[2] + "/final_weights.npy", run.model.get_weights()[0])
    print(json.dumps(run.history["loss"]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(emoji_subset, tmp_path):
    data = emoji_subset
    _dump(data, tmp_path)
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(RESUMABLE_TRAINING))

    def run_script(out, **env):
        return subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / out)],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=300)

    crashed = run_script("resumed", CRASH_AFTER="3")
    assert crashed.returncode == -9, crashed.stderr                        # killed by SIGKILL
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 3 and not (tmp_path / "resumed" / "model.keras").exists()
    resumed = run_script("resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    straight = run_script("straight")
    assert straight.returncode == 0, straight.stderr
    resumed_loss, straight_loss = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (resumed, straight))
    assert len(resumed_loss) == 8
    np.testing.assert_allclose(resumed_loss, straight_loss, rtol=1e-5)      # same batches, same random order
    np.testing.assert_allclose(np.load(tmp_path / "resumed" / "final_weights.npy"),
                               np.load(tmp_path / "straight" / "final_weights.npy"), rtol=1e-5, atol=1e-6)


def test_bad_inputs(emoji_subset):
    x, y = emoji_subset["train"]
    names, vectors = emoji_subset["seen_names"], emoji_subset["seen_vectors"]
    with pytest.raises(DeviseError, match="unknown method 'svm'"):
        train("svm", x, y, names, vectors)
    with pytest.raises(DeviseError, match="needs label vectors"):
        train("devise", x, y, names, None)
    with pytest.raises(DeviseError, match="label vectors for"):
        train("devise", x, y, names, vectors[:-1])
    with pytest.raises(DeviseError, match="class names"):
        train("random", x, y, names, vectors, val=(x, y, vectors))
    with pytest.raises(DeviseError, match="the linear head has no hidden setting"):
        train("devise", x, y, names, vectors, head="linear", hidden=512)


def test_ensemble_is_the_unit_mean_of_its_members_and_resumes(emoji_subset, tmp_path):
    """ensemble=3: three heads with seeds 0, 1000, 2000, each early-stopped on its own, saved as one model whose
    embedding is the unit mean of theirs; a rerun after losing one member trains only that one."""
    from devise.models.model import load_model_folder
    from devise.training.train import chosen_epochs

    data = emoji_subset
    val = (*data["unseen"], data["unseen_vectors"], data["unseen_names"])
    options = dict(val=val, loss="softmax", head="mlp", epochs=12, patience=2, ensemble=3)
    run = _fit(data, "devise", out_dir=tmp_path / "ens", **options)
    members = [load_model_folder(tmp_path / "ens" / "members" / str(k)) for k in range(3)]
    assert [m.settings["seed"] for m in members] == [0, 1000, 2000]
    x = data["unseen"][0]
    mean = np.mean([m.embed(x) for m in members], axis=0)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(run.embed(x), expected, atol=1e-5)
    np.testing.assert_allclose(load(tmp_path / "ens").embed(x), expected, atol=1e-5)   # saved as one model
    assert chosen_epochs(run.history) == [m.history["best_epoch"] or m.history["epochs_run"] for m in members]
    single = hit_at_k(members[0].predict_scores(x, data["unseen_vectors"]), data["unseen"][1], 5)
    assert hit_at_k(run.predict_scores(x, data["unseen_vectors"]), data["unseen"][1], 5) > single - 0.05

    # An interruption after two members: only the third is trained again, the same result comes out.
    kept = (tmp_path / "ens" / "members" / "0" / "model.keras").stat().st_mtime_ns
    for name in ("model.keras", "history.json", "settings.json", "labels.npz"):
        (tmp_path / "ens" / name).unlink()
    shutil.rmtree(tmp_path / "ens" / "members" / "2")
    again = _fit(data, "devise", out_dir=tmp_path / "ens", **options)
    assert (tmp_path / "ens" / "members" / "0" / "model.keras").stat().st_mtime_ns == kept
    np.testing.assert_allclose(again.embed(x), run.embed(x), atol=1e-5)
    with pytest.raises(DeviseError, match="for the devise method"):
        _fit(data, "random", epochs=2, ensemble=2)
