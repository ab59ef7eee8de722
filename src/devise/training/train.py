"""Phases 2-3 on cached features: the softmax baseline, DeViSE, the random-vector control and ConSE.

    model = train("devise", features, labels, class_names, label_vectors, val=(vf, vl, vvectors, vnames),
                  out_dir="runs/x")                 # a devise.models.model.DeviseModel
    model = devise.load("runs/x")                   # in any process (devise.models.model.load_model_folder)
    scores = model.predict_scores(features, vectors_of_any_labels, names)   # cosine (N, L), zero-shot

Methods:
- softmax: a classifier over the training classes (phase 2); predict_proba gives class probabilities.
- devise:  a head (the paper's linear M, or the blog's MLP) trained with the hinge rank loss (or the
           blog's cosine loss) to map features onto the training labels' word vectors.
- random:  the paper's control: the same model and loss, every label's vector replaced by a seeded
           random unit vector (per label name, so unseen labels get one too: zero-shot is then chance).
- conse:   a softmax model whose probabilities embed an image as a convex combination of the top-T
           training classes' vectors (Norouzi et al. 2014).

Training: Keras fit with a progress bar over deterministic per-epoch shuffles (seeded by seed and epoch,
so a resumed run sees the same batches). Validation after each epoch: hit@k of the validation images
(zero-shot against the validation classes' vectors when given), early stopping with the best weights
restored. With out_dir, each epoch writes a checkpoint (the .keras model, optimizer variables, loss
random state, history) atomically; calling train() again with the same arguments resumes it after a
crash. The run folder then holds model.keras, labels.npz (class names + vectors), settings.json
(method, vectors spec, backbone, hyper-parameters) and history.json.

Defaults were chosen on validation classes of the emoji benchmark (seen classes split 80/20 by class,
one seed, EfficientNet-Lite0 features, GloVe 50-d); see the report in the commit history.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from devise import defaults
from devise.storage import atomic_save_npz, atomic_write_json, check_manifest, write_errors, write_manifest
from devise.evaluation.confidence import store_confidence
from devise.data.datasets import (default_holdout_unseen, load_dataset, seen_validation_split, validation_split,
                             zero_shot_split)
from devise.errors import DeviseError
from devise.data.features import extract_features
from devise.evaluation.metrics import flat_hit_at_k
from devise.models.model import DeviseModel, load_model_folder, random_label_vectors, save_keras_model, write_run_manifest
from devise.models.presets import recipe_settings
from devise.runtime import device_count, process_index_and_count
from devise.labels.vectors import embed_labels, load_vectors, quiet_dropped_labels, unit_rows

METHODS = ("softmax", "devise", "random", "conse")
LOSSES = ("hinge", "cosine", "softmax")
HEADS = ("linear", "mlp")
OPTIMIZERS = ("adam", "adagrad")
DEFAULT_LEARNING_RATES = {"adam": 1e-3, "adagrad": 0.05}


# ---------------------------------------------------------------- small helpers

def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=2, sort_keys=True)


def _fingerprint(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- training

def _as_validation(val, method, class_names, label_vectors, seed):
    """Normalise `val` to (features, labels, score_vectors or None, is_zero_shot)."""
    if val is None:
        return None
    if not isinstance(val, (tuple, list)) or len(val) not in (2, 3, 4):
        raise DeviseError("val must be (features, labels) or (features, labels, label_vectors[, class_names])")
    features, labels = np.asarray(val[0], dtype=np.float32), np.asarray(val[1]).astype(np.int64)
    if len(features) != len(labels) or len(features) == 0:
        raise DeviseError(f"validation set: {len(features)} feature rows for {len(labels)} labels")
    if len(val) == 2:            # labels index the training classes
        vectors, names = label_vectors, class_names
    else:                        # zero-shot: labels index the validation classes
        vectors = np.asarray(val[2], dtype=np.float32)
        names = list(val[3]) if len(val) == 4 else None
    if method == "random":
        if names is None:
            raise DeviseError("the random control needs the validation class names: val=(f, l, vectors, names)")
        vectors = random_label_vectors(names, label_vectors.shape[1], seed)
    if vectors is not None:
        vectors = unit_rows(vectors)
        if labels.max() >= len(vectors):
            raise DeviseError(f"validation label {labels.max()} has no vector ({len(vectors)} given)")
    candidates = len(vectors) if vectors is not None else len(class_names)
    if candidates < 2:  # hit@k over one label is 1.0 whatever the model does
        raise DeviseError(f"validation over {candidates} label: it needs at least 2 candidate labels")
    return features, labels, vectors, len(val) > 2


def reportable_ks(ks, n_labels: int) -> list[int]:
    """The k of hit@k worth reporting over n_labels candidates: k >= n_labels is 1.0 whatever the model does."""
    return sorted(k for k in {int(k) for k in ks} if k < n_labels)


def _make_optimizer(name: str, learning_rate: float):
    import keras
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    return keras.optimizers.Adagrad(learning_rate)


def shuffled_batches(data, labels, batch_size, seed, rows=None, dtype="float32"):
    """A keras PyDataset of (data[rows], labels) batches, the order a permutation seeded by (seed, epoch)
    (so a resumed run sees the same batches). Each batch is read in ascending row order, which keeps
    reads from a memory-mapped array (features, or the uint8 image store) sequential.

    Across several devices every batch must split evenly: the last, short batch drops its few rows past
    a multiple of the device count (other rows each epoch). Across several hosts each host yields its
    own slice of every batch, and Keras assembles the global batch.
    """
    import keras

    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    devices = device_count()
    process, processes = process_index_and_count()
    if batch_size % devices:
        raise DeviseError(f"batch size {batch_size} does not split evenly across {devices} devices")
    # rows each batch uses: full batches, then the remainder cut to a multiple of the device count
    last = len(labels) % batch_size // devices * devices
    n_batches = len(labels) // batch_size + (last > 0)
    if n_batches == 0:
        raise DeviseError(f"{len(labels)} training examples are too few for {devices} devices")

    class ShuffledBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.set_epoch(0)

        def set_epoch(self, epoch):
            self.epoch = epoch
            self._order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(labels))

        def __len__(self):
            return n_batches

        def __getitem__(self, index):
            size = batch_size if index < len(labels) // batch_size else last
            pick = np.sort(self._order[index * batch_size:index * batch_size + size])
            per_host = size // processes
            pick = pick[process * per_host:(process + 1) * per_host]
            return np.asarray(data[rows[pick]], dtype=dtype), labels[pick]

    return ShuffledBatches()


def make_loss(method: str, loss: str, label_vectors, *, margin: float = 0.1, truncated: bool = True,
              normalize_output: bool = False, temperature: float = 0.1, seed: int = 0):
    """The training loss of a method: cross-entropy for softmax/conse, else the hinge rank or cosine loss
    over the training labels' vectors."""
    import keras
    from devise.training.losses import CosineLoss, HingeRankLoss, SoftmaxRankLoss

    if method in ("softmax", "conse"):
        return keras.losses.SparseCategoricalCrossentropy()
    if loss == "hinge":
        return HingeRankLoss(label_vectors, margin=margin, truncated=truncated,
                             normalize_output=normalize_output, seed=int(seed))
    if loss == "softmax":
        return SoftmaxRankLoss(label_vectors, temperature=temperature)
    return CosineLoss(label_vectors)


def train(method: str, features, labels, class_names, label_vectors=None, *, val=None,
          loss: str = "hinge", head: str = "linear", epochs: int = 100, batch_size: int = 128,
          learning_rate: float | None = None, optimizer: str = "adam", seed: int = 0, out_dir=None,
          margin: float = 0.1, truncated: bool = True, normalize_output: bool = False,
          temperature: float = 0.1, patience: int = 8, top_k: int = 5, T: int = 10, hidden: int | None = None,
          vectors_spec: str | None = None,
          backbone_name: str | None = None, extra_settings: dict | None = None, callbacks=(),
          verbose: int = 1, ensemble: int = 1) -> DeviseModel:
    """Train one method on (features (N, F), labels (N,) into class_names) and return the DeviseModel.

    label_vectors: (C, D) vectors of class_names (needed by devise/random/conse; random uses only D).
    val: (features, labels) scored over the training classes, or (features, labels, label_vectors
        [, class_names]) scored zero-shot over the validation classes (class_names needed by "random").
    Early stopping on validation hit@top_k (patience epochs) restores the best epoch's weights.
    out_dir: the run folder; an interrupted run with the same settings resumes from its last checkpoint.
    extra_settings: recorded in settings.json (e.g. the dataset split).
    callbacks: extra Keras callbacks, run after validation and checkpointing of each epoch.
    ensemble: K > 1 trains K heads (seeds seed + 1000 k, each with its own early stopping; run folder
        members/0..K-1) and returns them as one (heads.ensemble_head); epochs may then be a list of K.
    """
    if int(ensemble) > 1:  # every argument but these passes on to each member unchanged
        options = {k: v for k, v in locals().items() if k not in (
            "method", "features", "labels", "class_names", "label_vectors", "epochs", "seed", "out_dir", "ensemble")}
        return _train_ensemble(method, features, labels, class_names, label_vectors, int(ensemble), epochs,
                               int(seed), out_dir, options)
    import keras

    from devise.models.heads import build_head

    for value, allowed, what in ((method, METHODS, "method"), (loss, LOSSES, "loss"), (head, HEADS, "head"),
                                 (optimizer, OPTIMIZERS, "optimizer")):
        if value not in allowed:
            raise DeviseError(f"unknown {what} '{value}': choose one of {', '.join(allowed)}")
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    class_names = [str(n) for n in class_names]
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise DeviseError(f"training set: features of shape {features.shape} for {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DeviseError(f"training labels must index the {len(class_names)} class names (got {labels.max()})")
    if len(set(labels.tolist())) < 2:  # with one class every loss is 0: nothing would be learnt
        raise DeviseError(f"training needs images of at least 2 classes, got {len(set(labels.tolist()))}")
    if label_vectors is None and method != "softmax":
        raise DeviseError(f"method '{method}' needs label vectors")
    if label_vectors is not None:
        label_vectors = unit_rows(label_vectors)
        if len(label_vectors) != len(class_names):
            raise DeviseError(f"{len(label_vectors)} label vectors for {len(class_names)} class names")
    if method == "random":
        label_vectors = random_label_vectors(class_names, label_vectors.shape[1], seed)
    validation = _as_validation(val, method, class_names, label_vectors, seed)
    # The linear map on unit-length features needs a larger Adam step (chosen on validation classes).
    default_rate = 1e-2 if (optimizer == "adam" and head == "linear" and method in ("devise", "random")) \
        else DEFAULT_LEARNING_RATES[optimizer]
    learning_rate = float(learning_rate or default_rate)

    classifies = method in ("softmax", "conse")
    settings = {
        "method": method, "loss": None if classifies else loss, "head": "softmax" if classifies else head,
        "epochs": int(epochs), "batch_size": int(batch_size), "learning_rate": learning_rate,
        "optimizer": optimizer, "seed": int(seed), "margin": float(margin), "truncated": bool(truncated),
        "normalize_output": bool(normalize_output), "temperature": float(temperature),
        "patience": int(patience), "top_k": int(top_k), "T": int(T), "hidden": hidden,
        "vectors": vectors_spec, "backbone": backbone_name, "feature_dim": int(features.shape[1]),
        "vector_dim": None if label_vectors is None else int(label_vectors.shape[1]),
        "num_classes": len(class_names), "num_train": int(len(labels)),
        "data": _fingerprint(features, labels, *(() if label_vectors is None else (label_vectors,))),
        "val_data": None if validation is None else _fingerprint(validation[0], validation[1]),
        "val_zero_shot": None if validation is None else bool(validation[3]),
        **(extra_settings or {}),
    }

    keras.utils.set_random_seed(int(seed))
    model = build_head(settings["head"], features.shape[1], len(class_names) if classifies else label_vectors.shape[1],
                       **({"hidden": int(hidden)} if hidden else {}))
    loss_fn = make_loss(method, loss, label_vectors, margin=margin, truncated=truncated,
                        normalize_output=normalize_output, temperature=temperature, seed=int(seed))
    if getattr(loss_fn, "seed_generator", None) is not None:
        # The loss's random state must be a model variable so the (jitted, stateless) JAX train step
        # threads it through and advances it each step; otherwise every batch would reuse one order.
        model.hinge_loss_seed = loss_fn.seed_generator
    model.compile(optimizer=_make_optimizer(optimizer, learning_rate), loss=loss_fn)

    run = DeviseModel(method, model, class_names, label_vectors, settings, {}, None, name=method)
    out = Path(out_dir) if out_dir is not None else None
    state = {"epoch": 0, "best_score": None, "best_epoch": None, "wait": 0, "history": {}}
    best_weights = None
    if out is not None:
        state, best_weights = _prepare_run_folder(out, settings, class_names, label_vectors, model, loss_fn)

    def validate():
        vf, vl, vvectors, _ = validation
        if classifies and not validation[3]:
            scores = run.predict_proba(vf)
        elif vvectors is None:
            raise DeviseError("zero-shot validation of a softmax run needs training label vectors (ConSE)")
        else:
            scores = run.embed(vf) @ vvectors.T
        return {f"val_hit@{k}": v for k, v in flat_hit_at_k(scores, vl, sorted({1, monitor_k})).items()}

    # The random control scored zero-shot is chance by construction: it neither stops early nor picks
    # a "best" epoch on that score (it keeps the last weights); the score is still recorded.
    selects = validation is not None and not (method == "random" and validation[3])
    batches = shuffled_batches(features, labels, int(batch_size), int(seed))
    # Few validation candidates: monitor the largest k that can still miss (hit@5 over 3 labels is 1.0).
    monitor_k = int(top_k) if validation is None else \
        max(1, min(int(top_k), (len(validation[2]) if validation[2] is not None else len(class_names)) - 1))
    monitor = f"val_hit@{monitor_k}"

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            batches.set_epoch(epoch)

        def on_epoch_end(self, epoch, logs=None):
            nonlocal best_weights
            logs = logs if logs is not None else {}
            if validation is not None:
                logs.update(validate())
            if selects:
                score = logs[monitor]
                if state["best_score"] is None or score > state["best_score"]:
                    state.update(best_score=score, best_epoch=epoch + 1, wait=0)
                    best_weights = [np.array(w) for w in model.get_weights()]
                else:
                    state["wait"] += 1
                if state["wait"] >= patience:
                    self.model.stop_training = True
            for key, value in logs.items():
                state["history"].setdefault(key, []).append(float(value))
            state["epoch"] = epoch + 1
            state["stopped"] = bool(self.model.stop_training)
            if out is not None:
                _write_checkpoint(out, model, loss_fn, state, best_weights)
            if verbose and selects:
                print(f"  {monitor} {logs[monitor]:.4f} (best {state['best_score']:.4f} at epoch {state['best_epoch']})",
                      flush=True)

    finished = state.get("stopped") or state["epoch"] >= epochs
    if not finished:
        model.fit(batches, epochs=int(epochs), initial_epoch=int(state["epoch"]), shuffle=False,
                  callbacks=[EpochEnd(), *callbacks], verbose=verbose)
    if best_weights is not None:
        model.set_weights(best_weights)
    run.history = {"epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                   "best_" + monitor: state["best_score"], **state["history"]}
    if out is not None:
        save_keras_model(model, out / "model.keras")
        _write_json(out / "history.json", run.history)
        write_run_manifest(out, settings)
        run.path, run.name = out, str(out)
    return run


ENSEMBLE_SEED_STEP = 1000  # member k trains with seed + 1000 k (as chosen on validation; see presets.py)


def _train_ensemble(method, features, labels, class_names, label_vectors, ensemble: int, epochs, seed: int,
                    out_dir, options: dict) -> DeviseModel:
    """train(..., ensemble=K): K members, resumable one by one, combined into one head."""
    from devise.models.heads import ensemble_head

    if method != "devise":  # the random control's vectors depend on the seed; classifiers have no projection
        raise DeviseError(f"an ensemble of heads is for the devise method, not '{method}'")
    per_member = list(epochs) if isinstance(epochs, (list, tuple)) else [epochs] * ensemble
    if len(per_member) != ensemble:
        raise DeviseError(f"{len(per_member)} epoch counts for an ensemble of {ensemble} heads")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / "model.keras").is_file() and (out / "history.json").is_file():
        raise DeviseError(f"{out} already holds this finished run: load it with devise.load or choose another folder")
    members = []
    for k, member_epochs in enumerate(per_member):
        folder = None if out is None else out / "members" / str(k)
        if folder is not None and (folder / "model.keras").is_file() and (folder / "history.json").is_file():
            members.append(load_model_folder(folder))  # finished before an interruption
            continue
        members.append(train(method, features, labels, class_names, label_vectors, epochs=int(member_epochs),
                             seed=seed + ENSEMBLE_SEED_STEP * k, out_dir=folder, **options))
    settings = {**members[0].settings, "seed": seed, "epochs": [int(e) for e in per_member], "ensemble": ensemble}
    histories = [m.history for m in members]
    history = {key: [h.get(key) for h in histories] for key in histories[0] if key.startswith(("best_", "epochs_run"))}
    history["members"] = histories
    run = DeviseModel(method, ensemble_head([m.model for m in members]), members[0].class_names,
                      members[0].label_vectors, settings, history, name=method)
    if out is not None:
        run.save(out)
        run.path, run.name = out, str(out)
    return run


def chosen_epochs(history: dict):
    """The epoch count early stopping chose (the last epoch run where it chose none); a list for an
    ensemble, one per member: what a refit on more classes trains for."""
    best, ran = history.get("best_epoch"), history["epochs_run"]
    if isinstance(ran, list):
        return [int(b or r) for b, r in zip(best or [None] * len(ran), ran)]
    return int(best or ran)


# ---------------------------------------------------------------- run folder and checkpoints

def _prepare_run_folder(out: Path, settings, class_names, label_vectors, model, loss_fn):
    """Create the run folder, or check it holds the same run and load its last checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise DeviseError(f"{out} holds a run with other settings ({', '.join(changed)}): choose another folder")
        if (out / "model.keras").is_file() and (out / "history.json").is_file():
            raise DeviseError(f"{out} already holds this finished run: load it with devise.load or choose another folder")
    else:
        atomic_save_npz(out / "labels.npz", class_names=np.asarray(class_names, dtype=str),
                   label_vectors=np.zeros((0, 0), np.float32) if label_vectors is None else label_vectors)
        _write_json(settings_path, settings)
    return _load_checkpoint(out, model, loss_fn)


def optimizer_arrays(model) -> dict[str, np.ndarray]:
    """The compiled model's optimizer variables (moments, step count) as opt_0, opt_1, ... arrays."""
    import keras
    return {f"opt_{i}": np.asarray(keras.ops.convert_to_numpy(v.value)) for i, v in enumerate(model.optimizer.variables)}


def restore_optimizer(model, arrays) -> None:
    """Put back what optimizer_arrays saved (the optimizer is built first, as it is on the first step)."""
    model.optimizer.build(model.trainable_variables)
    for i, variable in enumerate(model.optimizer.variables):
        variable.assign(arrays[f"opt_{i}"])


def _write_checkpoint(out: Path, model, loss_fn, state, best_weights) -> None:
    """Write checkpoint/ (model.keras, optimizer + best weights, state.json, manifest.json) as one atomic
    folder swap; a full disk is one line, the partial folder removed and the last checkpoint kept."""
    final, old = out / "checkpoint", out / "checkpoint.old"
    with write_errors(final):
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-checkpoint-"))
    with write_errors(final, cleanup=[tmp]):
        model.save(tmp / "model.keras")
        arrays = optimizer_arrays(model)
        if best_weights is not None:
            arrays.update({f"best_{i}": w for i, w in enumerate(best_weights)})
        if getattr(loss_fn, "seed_generator", None) is not None:
            arrays["loss_seed_state"] = np.array(loss_fn.seed_generator.state.value)
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / "state.json").write_text(json.dumps(state))
        write_manifest(tmp)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, model, loss_fn):
    """Restore weights, optimizer variables and loss random state from the last complete checkpoint."""
    import keras
    fresh = {"epoch": 0, "best_score": None, "best_epoch": None, "wait": 0, "history": {}}
    folder = out / "checkpoint"
    if not (folder / "state.json").is_file():
        folder = out / "checkpoint.old"      # a crash between the two renames of _write_checkpoint
    if not (folder / "state.json").is_file():
        return fresh, None
    try:
        check_manifest(folder)
    except DeviseError as exc:  # damaged on disk: training again from the start is slower, never wrong
        warnings.warn(f"{exc}; the checkpoint is not used, training starts again", stacklevel=2)
        return fresh, None
    state = json.loads((folder / "state.json").read_text())
    saved = keras.saving.load_model(folder / "model.keras", compile=False)
    model.set_weights(saved.get_weights())
    with np.load(folder / "arrays.npz") as arrays:
        restore_optimizer(model, arrays)
        best = [arrays[f"best_{i}"] for i in range(len(model.get_weights()))] if "best_0" in arrays else None
        if "loss_seed_state" in arrays and getattr(loss_fn, "seed_generator", None) is not None:
            loss_fn.seed_generator.state.assign(arrays["loss_seed_state"])
    print(f"resuming {out} after epoch {state['epoch']}", flush=True)
    return state, best


# ---------------------------------------------------------------- datasets (what `devise train` runs)

CLASS_TEXTS = "mean"  # recorded in a run's settings: runs from before it used one text ("one")


def class_label_vectors(dataset, vectors, drop_missing: bool = False, texts: str = CLASS_TEXTS):
    """Vectors of a dataset's classes -> (unit (C, D) matrix with zero rows for dropped classes, kept mask, report).

    A class is embedded by its display name (with a sentence encoder, linked to its synset: the unit
    mean of "name", "name: gloss" and "name, a kind of <hypernym>", vectors.sentence_label_texts; texts=
    "one" for the last alone); a name with no word vector falls back to its synset (the paper's rule:
    the synset's first lemma with a vector, else its nearest hypernym's). A class with neither is an
    error unless drop_missing, which drops it (and reports it). Never a random vector.
    """
    names = list(dataset.classes)
    wnids = list(getattr(dataset, "wnids", None) or [None] * len(names))
    # A sentence encoder reads the class's synset too (vectors.sentence_label_text); names without a
    # word vector may still get one by synset below, and the report says so.
    with quiet_dropped_labels():
        by_name = embed_labels(names, vectors, drop_missing=True, synsets=wnids, texts=texts)
    rows = dict(zip(by_name.labels, by_name.matrix))
    fallback = [(n, w) for n, w in zip(names, wnids) if n not in rows and w]
    if fallback:
        by_synset = embed_labels([w for _, w in fallback], vectors, drop_missing=True)
        synset_rows = dict(zip(by_synset.labels, by_synset.matrix))
        for name, wnid in fallback:
            if wnid in synset_rows:
                rows[name] = synset_rows[wnid]
    missing = [n for n in names if n not in rows]
    if missing and not drop_missing:
        raise DeviseError(f"{len(missing)} of {len(names)} classes of {dataset.name} have no vector in "
                          f"{vectors.name}: {', '.join(map(repr, missing[:20]))} (use --drop-missing to drop them)")
    dim = by_name.matrix.shape[1]
    matrix = np.stack([rows.get(n, np.zeros(dim, np.float32)) for n in names]).astype(np.float32)
    kept = np.array([n in rows for n in names])
    report = (f"{int(kept.sum())}/{len(names)} classes embedded with {vectors.name} ({dim}-d); "
              f"{len([f for f in fallback if f[0] in rows])} through their WordNet synset"
              + (f"; dropped: {', '.join(map(repr, missing[:20]))}" if missing else ""))
    return matrix, kept, report


# How `devise train DATASET` validates adapts to the data (the log says which and why):
# zero-shot validation classes only when at least this many can be held out: over fewer, hit@5 moves in
# coarse steps and with one validation class it is 1.0 from the first epoch, so it cannot choose an epoch.
MIN_ZERO_SHOT_VAL_CLASSES = 20
# else held-out images of the training classes, when at least this many: fewer make early stopping noise
MIN_SEEN_VAL_IMAGES = 20
VALIDATION_FRACTION = 0.2     # of the classes (zero-shot) or of each class's training images (seen)
FIXED_EPOCHS = 20             # no validation possible (tiny folders) and no --epochs given


def choose_validation(split, kept, usable, seed: int = 0):
    """(mode, ValidationSplit or None, why) for the seen classes of a split: "zero-shot" (validation
    classes held out), "seen" (held-out images of the training classes) or "none" (fixed epochs)."""
    by_class = validation_split(split, seed=seed, fraction=VALIDATION_FRACTION)
    n_classes = int(sum(kept[c] for c in by_class.val_classes))
    n_train = int(sum(kept[c] for c in by_class.train_classes))
    if n_classes >= MIN_ZERO_SHOT_VAL_CLASSES and n_train >= 2:
        return "zero-shot", by_class, (f"zero-shot on {n_classes} held-out validation classes "
                                       f"(at least {MIN_ZERO_SHOT_VAL_CLASSES} can be held out)")
    by_image = seen_validation_split(split, seed=seed, fraction=VALIDATION_FRACTION)
    n_images = int(np.asarray(usable)[by_image.val].sum())
    too_few_classes = (f"zero-shot validation needs at least {MIN_ZERO_SHOT_VAL_CLASSES} validation classes, "
                       f"{n_classes} possible")
    if n_images >= MIN_SEEN_VAL_IMAGES:
        return "seen", by_image, (f"seen classes, {n_images} held-out images of the training classes "
                                  f"({too_few_classes})")
    return "none", None, (f"none, a fixed number of epochs ({too_few_classes}; seen-class validation needs "
                          f"at least {MIN_SEEN_VAL_IMAGES} held-out images, {n_images} possible)")


def train_dataset(dataset_spec, method: str | None = None, *, preset: str | None = None, out_dir=None,
                  vectors: str = defaults.VECTORS, backbone: str = defaults.TRAIN_BACKBONE, seed: int = 0,
                  split_seed: int | None = None, drop_missing: bool = False, holdout_unseen: float | None = None,
                  **train_kwargs) -> DeviseModel:
    """`devise train`: features from the cache, the dataset's split, then train() -> the DeviseModel.

    method: "devise" unless a preset names another. preset: a training recipe of devise.models.presets (e.g.
    "devise_softmax_mlp", the benchmark's methods): its method, loss, head and options, each overridden
    by an explicit `method` or keyword argument.

    holdout_unseen: the fraction of classes held out as unseen (the zero-shot protocol, for evaluation).
    Default: 0.25 for the emoji benchmark (its split), 0 for a folder: it trains on all its classes.
    A seeded 20% of each seen class's images (or the held-out style / test folder) is kept out as the
    seen-class test set. Validation (choose_validation): zero-shot on held-out validation classes when
    at least 20 of them are possible, else held-out images of the training classes, else a fixed
    number of epochs. With every class trained and zero-shot validation, the model is first fit on the
    training classes to choose the epoch count (run folder "selection/"), then refit on all classes
    for that many epochs (Xian et al.'s protocol, as the benchmark does). The held-out unseen classes are
    never touched; the run's settings record the split so evaluation can rebuild it.
    """
    recipe = recipe_settings(preset) if preset is not None else {}
    method = method or recipe.pop("method", "devise")
    recipe.pop("method", None)
    train_kwargs = {**recipe, **train_kwargs}
    split_seed = seed if split_seed is None else split_seed
    if holdout_unseen is None:
        # A registered dataset's default (emoji: 0.25, the benchmark's split); a user's folder: 0, all classes.
        holdout_unseen = default_holdout_unseen(str(dataset_spec))
    holdout_unseen = float(holdout_unseen)
    if not 0 <= holdout_unseen < 1:
        raise DeviseError(f"--holdout-unseen {holdout_unseen:g}: give the fraction of classes held out as "
                          "unseen, at least 0 and below 1 (e.g. 0.25)")
    dataset = load_dataset(dataset_spec)
    word_vectors = load_vectors(vectors)
    matrix, kept, report = class_label_vectors(dataset, word_vectors, drop_missing)
    print(report, flush=True)
    names = list(dataset.classes)
    if kept.sum() < 2:
        found = ", ".join(repr(names[c]) for c in np.flatnonzero(kept)) or "none"
        raise DeviseError(f"{dataset.name}: {int(kept.sum())} class with a word vector ({found}); training needs "
                          "at least 2 classes (one sub-folder of images per class)")
    split = zero_shot_split(dataset, seed=split_seed, unseen_fraction=holdout_unseen)
    seen = np.asarray([c for c in split.seen_classes if kept[c]], dtype=np.int64)
    if len(seen) < 2:
        raise DeviseError(f"{dataset.name}: {len(seen)} class left to train on after holding out "
                          f"{holdout_unseen:g} of the classes as unseen; training needs at least 2 "
                          "(lower --holdout-unseen or add classes)")
    feature_set = extract_features(dataset, backbone)
    usable = np.asarray(feature_set.valid, bool) & kept[np.asarray(dataset.labels)]

    def select(image_indices, class_indices):
        class_indices = np.asarray([c for c in class_indices if kept[c]], dtype=np.int64)
        image_indices = np.asarray([i for i in image_indices if usable[i]], dtype=np.int64)
        position = np.full(len(dataset.classes), -1)
        position[class_indices] = np.arange(len(class_indices))
        chosen = position[np.asarray(dataset.labels)[image_indices]]
        image_indices, chosen = image_indices[chosen >= 0], chosen[chosen >= 0]  # only images of these classes
        return np.asarray(feature_set.features[image_indices], np.float32), chosen, class_indices

    mode, val_split, why = choose_validation(split, kept, usable, split_seed)
    all_classes = holdout_unseen == 0
    unseen_kept = [int(c) for c in split.unseen_classes if kept[c]]
    print(f"classes: {'all ' + str(len(seen)) if all_classes else str(len(seen))} trained"
          + ("" if all_classes else f", {len(unseen_kept)} held out as unseen (holdout {holdout_unseen:g})")
          + f"; validation: {why}", flush=True)
    if mode == "none" and "epochs" not in train_kwargs:
        train_kwargs = {**train_kwargs, "epochs": FIXED_EPOCHS}
    settings_extra = {"dataset": str(dataset_spec), "split_seed": int(split_seed), "class_texts": CLASS_TEXTS,
                      "unseen_fraction": holdout_unseen, "validation": mode, "unseen_classes": unseen_kept,
                      **({"preset": preset} if preset is not None else {})}
    fit = dict(seed=seed, vectors_spec=str(vectors), backbone_name=backbone, **train_kwargs)

    selection = None
    if mode == "zero-shot":
        train_x, train_y, train_classes = select(val_split.train, val_split.train_classes)
        val_x, val_y, val_classes = select(val_split.val, val_split.val_classes)
        val = (val_x, val_y, matrix[val_classes], [names[c] for c in val_classes])
    elif mode == "seen":
        train_x, train_y, train_classes = select(val_split.train, seen)
        val_x, val_y, _ = select(val_split.val, train_classes)
        val, val_classes = (val_x, val_y), train_classes  # labels index the training classes
    else:
        train_x, train_y, train_classes = select(split.train, seen)
        val, val_classes = None, np.zeros(0, np.int64)
    confidence_val = None if val is None else (val[0], val[1], matrix[val_classes], [names[c] for c in val_classes])
    if mode == "zero-shot" and all_classes:
        # Stage 1 chooses the epoch count on the validation classes; stage 2 trains every class that long.
        sel_dir = None if out_dir is None else Path(out_dir) / "selection"
        if sel_dir is not None and (sel_dir / "model.keras").is_file() and (sel_dir / "history.json").is_file():
            selection = load_model_folder(sel_dir)  # finished before an interruption: reuse it
        else:
            selection = train(method, train_x, train_y, [names[c] for c in train_classes], matrix[train_classes],
                              val=val, out_dir=sel_dir, **fit,
                              extra_settings={**settings_extra, "stage": "selection",
                                              "train_classes": train_classes.tolist(),
                                              "val_classes": val_classes.tolist()})
        epochs = chosen_epochs(selection.history)
        train_x, train_y, train_classes = select(split.train, seen)
        val, val_classes = None, np.zeros(0, np.int64)
        fit["epochs"] = epochs
    settings_extra.update(train_classes=train_classes.tolist(), val_classes=val_classes.tolist())
    run = train(method, train_x, train_y, [names[c] for c in train_classes], matrix[train_classes],
                val=val, out_dir=out_dir, extra_settings=settings_extra, **fit)
    run.history["validation"] = why
    if confidence_val is not None and run.method != "random" and run.label_vectors is not None:
        store_confidence(run, selection or run, *confidence_val, fit_on=f"validation ({why})")
    if selection is not None:
        best = {k: v for k, v in selection.history.items() if k.startswith("best_")}
        run.history["selection"] = {"epochs_run": selection.history["epochs_run"], **best}
    # A first look at the unseen classes (the evaluation module holds the full protocol): zero-shot
    # flat hit@k of every unseen image against the unseen classes only.
    unseen_x, unseen_y, unseen_classes = select(split.unseen, split.unseen_classes)
    ks = reportable_ks((1, 2, 5, 10), len(unseen_classes))
    if len(unseen_y) and ks and (method != "softmax" or run.label_vectors is not None):
        scores = run.predict_scores(unseen_x, matrix[unseen_classes], [names[c] for c in unseen_classes])
        run.history["unseen_zero_shot"] = {f"hit@{k}": v for k, v in flat_hit_at_k(scores, unseen_y, ks).items()}
        run.history["unseen_zero_shot"].update(images=int(len(unseen_y)), classes=int(len(unseen_classes)))
    # Seen classes on held-out images (style, test folder or seeded 20%), over the training classes.
    seen_x, seen_y, _ = select(split.seen_test, train_classes)
    ks = reportable_ks((1, 2, 5, 10), len(train_classes))
    if len(seen_y) and ks:
        if method in ("softmax", "conse"):
            scores = run.predict_proba(seen_x)
        else:
            scores = run.predict_scores(seen_x, run.label_vectors, run.class_names)
        run.history["seen_test"] = {f"hit@{k}": v for k, v in flat_hit_at_k(scores, seen_y, ks).items()}
        run.history["seen_test"].update(images=int(len(seen_y)), classes=int(len(train_classes)))
    if run.path is not None:
        _write_json(run.path / "history.json", run.history)
        write_run_manifest(run.path, run.settings)
    return run


def training_summary(run: DeviseModel) -> str:
    """What `devise train` prints when done: epochs and the validation behind them, then the first
    look at held-out seen images and unseen classes."""
    history = run.history
    best_key = next((k for k in history if k.startswith("best_val")), None)
    selection = history.get("selection") or {}
    chosen = next((k for k in selection if k.startswith("best_val")), None)
    def show(value):  # a number, or one per member of an ensemble
        return "/".join(show(v) for v in value) if isinstance(value, list) else \
            f"{value:.3f}" if isinstance(value, float) else str(value)

    if best_key and history.get(best_key) is not None:
        kind = "validation classes" if run.settings.get("validation") == "zero-shot" else "held-out images"
        best = f", best epoch {show(history['best_epoch'])} ({kind} {best_key[5:]} {show(history[best_key])})"
    elif chosen and selection.get(chosen) is not None:
        best = (f" on all {len(run.class_names)} classes, the count chosen on validation classes "
                f"({chosen[5:]} {show(selection[chosen])})")
    else:
        best = " (last epoch kept)"
    heads = f" (an ensemble of {run.settings['ensemble']} heads)" if run.settings.get("ensemble", 1) > 1 else ""
    lines = [f"{run.method}{heads}: {show(history['epochs_run'])} epochs{best} -> {run.path}",
             f"validation: {history.get('validation')}"]
    for part in ("seen_test", "unseen_zero_shot"):
        if part in history:
            lines.append(f"{part}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in history[part].items()))
    return "\n".join(lines)
