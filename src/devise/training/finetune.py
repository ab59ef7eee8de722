"""End-to-end fine-tuning of a trained run's backbone top blocks from images (the paper's later stage).

    new = finetune_run("runs/x", "runs/x-ft", blocks=2, epochs=2)   # = devise finetune runs/x --out runs/x-ft
    backbone = devise.load("runs/x-ft").backbone                   # the fine-tuned backbone, any process

A run trained on cached features (devise.training.train) is a head over a frozen backbone. Here one Keras model
is built: uint8 images -> augmentation (horizontal flip, random zoom-in = a random crop resized back;
active only while training) -> the backbone's features_model -> the run's head, and trained with the
run's own loss and label vectors on the run's own training images (its split is rebuilt from the
settings), with a small learning rate. Only the last `blocks` blocks of the backbone are trainable
(EfficientNet-Lite0: "head" is the final 1x1 conv, "blocks_15" the last MBConv block, ...); batch
norm layers (ResNet-50) stay frozen in inference mode. The head keeps training too.

The result is a new run folder: the run's files with the fine-tuned head, plus backbone.weights.npz
(every backbone weight, by layer name) recorded in settings["backbone_weights"]. Weights rather than a
saved graph, so the loader rebuilds the graph for the machine it runs on (depthwise formulation,
precision): a backbone fine-tuned on a GPU runs fast on a CPU. Its cache_key hashes the weights file,
so the feature cache never mixes its features with the pretrained backbone's. Images come from the
uint8 image store (devise.data.features.build_image_store), decoded once. On a CPU this works but is slow
(measured in tests/test_finetune.py); it is meant for a GPU.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from devise.storage import atomic_save_npz
from devise.models.backbones import BACKBONES, fresh_features_model, to_uint8, weighted_layers
from devise.data.datasets import load_dataset, seen_validation_split, zero_shot_split
from devise.errors import DeviseError
from devise.data.features import build_image_store
from devise.models.model import DeviseModel, load_model_folder
from devise.training.train import make_loss, optimizer_arrays, restore_optimizer, shuffled_batches

WEIGHTS_FILE = "backbone.weights.npz"
DEFAULT_BLOCKS = 2  # EfficientNet-Lite0: the head conv and the last MBConv block


# ---------------------------------------------------------------- backbone layers and blocks

def _block_of(layer_name: str) -> str:
    """The block a layer belongs to: "blocks_15_expand" -> "blocks_15", "conv5_block3_2_conv" -> "conv5_block3"."""
    match = re.match(r"^(.*?blocks?_?\d+)", layer_name)
    return match.group(1) if match else layer_name


def backbone_blocks(features_model) -> list[str]:
    """The backbone's blocks with weights, input to output (e.g. stem, blocks_0, ..., blocks_15, head)."""
    blocks = []
    for layer in weighted_layers(features_model):
        block = _block_of(layer.name)
        if block not in blocks:
            blocks.append(block)
    return blocks


def freeze_below(features_model, blocks: int) -> list[str]:
    """Make only the last `blocks` blocks trainable (batch norm always frozen); returns their names."""
    import keras

    names = backbone_blocks(features_model)
    if not 1 <= blocks <= len(names):
        raise DeviseError(f"blocks must be between 1 and {len(names)} for this backbone, not {blocks}")
    top = set(names[-blocks:])
    for layer in weighted_layers(features_model):
        # Batch norm in training mode would re-estimate its statistics from a few small batches.
        layer.trainable = _block_of(layer.name) in top and not isinstance(layer, keras.layers.BatchNormalization)
    return names[-blocks:]


def _save_weights(features_model, path: Path) -> None:
    arrays = {f"{layer.name}/{i}": np.asarray(w) for layer in weighted_layers(features_model)
              for i, w in enumerate(layer.get_weights())}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# ---------------------------------------------------------------- the end-to-end model

def _augmentation(seed: int):
    """Flip left-right and zoom in by up to 25% (a random crop resized back); identity at inference."""
    import keras

    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomZoom((-0.25, 0.0), fill_mode="reflect", seed=seed + 1),
    ], name="augmentation")


def _round_to_uint8():
    """Interpolated float pixels back to uint8 (rounded; the backbone's input is uint8)."""
    import keras

    class RoundToUint8(keras.layers.Layer):
        def call(self, x):
            return to_uint8(x)

    return RoundToUint8(name="round_to_uint8")


def end_to_end_model(features_model, head, seed: int = 0):
    """uint8 images -> augmentation (training only) -> features_model -> head, as one Keras model."""
    import keras

    images = keras.Input(features_model.input_shape[1:], dtype="uint8", name="images")
    x = _augmentation(seed)(images)
    x = _round_to_uint8()(x)
    return keras.Model(images, head(features_model(x)), name="devise_end_to_end")


def _run_loss(run):
    """The loss the run was trained with, over its own training label vectors."""
    s = run.settings
    return make_loss(run.method, s.get("loss") or "hinge", run.label_vectors, margin=s.get("margin", 0.1),
                     truncated=s.get("truncated", True), normalize_output=s.get("normalize_output", False),
                     temperature=s.get("temperature", 0.1), seed=int(s.get("seed", 0)))


def training_images(settings) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The run's training images: (all dataset paths, indices of its training images, their labels
    into settings["train_classes"]), rebuilt from the split seed as devise.training.train.train_dataset does."""
    if not settings.get("dataset") or settings.get("train_classes") is None:
        raise DeviseError("this run does not record its dataset and training classes (train it with devise train)")
    dataset = load_dataset(settings["dataset"])
    split_seed = int(settings.get("split_seed", settings.get("seed", 0)))
    # The split train_dataset made: its unseen fraction (0.25 before runs recorded one), and with
    # seen-class validation the held-out images of the training classes stay out here too.
    split = zero_shot_split(dataset, seed=split_seed, unseen_fraction=float(settings.get("unseen_fraction", 0.25)))
    candidates = (seen_validation_split(split, seed=split_seed).train if settings.get("validation") == "seen"
                  else split.train)
    train_classes = np.asarray(settings["train_classes"], dtype=np.int64)
    position = np.full(len(dataset.classes), -1)
    position[train_classes] = np.arange(len(train_classes))
    labels = position[np.asarray(dataset.labels)]
    indices = np.asarray([i for i in candidates if labels[i] >= 0], dtype=np.int64)
    return list(dataset.paths), indices, labels[indices]


# ---------------------------------------------------------------- fine-tuning

def finetune_run(run_dir, out_dir, *, blocks: int = DEFAULT_BLOCKS, epochs: int = 1, learning_rate: float = 1e-4,
                 batch_size: int = 32, max_images: int | None = None, seed: int = 0, verbose: int = 1,
                 callbacks=()) -> DeviseModel:
    """Fine-tune a run's backbone top `blocks` blocks and head end to end; write and return the new model.

    run_dir: a run folder from devise train (its dataset, split and training classes are reused).
    out_dir: the new run folder (must not exist yet; written atomically). Each epoch ends with a
        checkpoint in out_dir + ".partial": rerun the same call after a crash and it resumes there.
    max_images: a seeded random subset of the training images (quick trials); None = all of them.
    """
    import keras

    run = load_model_folder(run_dir)
    parts = BACKBONES[run.backbone_name].parts if run.backbone_name in BACKBONES else ()
    if parts:  # their layers share names: their blocks would be one list, their saved weights one file
        raise DeviseError(f"{run_dir}: its backbone {run.backbone_name} joins {' and '.join(parts)}; fine-tuning "
                          f"takes one backbone (train the run with --backbone {parts[0]})")
    out = Path(out_dir)
    if out.exists():
        raise DeviseError(f"{out} already exists: choose another folder for the fine-tuned run")
    partial = out.with_name(out.name + ".partial")  # per-epoch checkpoints; a rerun resumes from them
    options = {"from": str(Path(run_dir).resolve()), "blocks": int(blocks), "epochs": int(epochs),
               "learning_rate": float(learning_rate), "batch_size": int(batch_size),
               "max_images": None if max_images is None else int(max_images), "seed": int(seed)}
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise DeviseError(f"epochs ({epochs}) and batch size ({batch_size}) must be >= 1, the learning rate > 0")
    paths, indices, labels = training_images(run.settings)
    if max_images is not None and max_images < len(indices):
        chosen = np.sort(np.random.default_rng(seed).choice(len(indices), int(max_images), replace=False))
        indices, labels = indices[chosen], labels[chosen]
    backbone = run.backbone  # the run's own: fine-tuning a fine-tuned run starts from its weights
    images, valid, _ = build_image_store(paths, backbone.image_size, progress=verbose > 0)
    keep = np.asarray(valid, bool)[indices]
    indices, labels = indices[keep], labels[keep]
    if len(indices) == 0:
        raise DeviseError(f"{run_dir}: no readable training images to fine-tune on")

    keras.utils.set_random_seed(int(seed))
    features_model = fresh_features_model(backbone)
    trainable_blocks = freeze_below(features_model, int(blocks))
    model = end_to_end_model(features_model, run.model, seed)
    loss_fn = _run_loss(run)
    if getattr(loss_fn, "seed_generator", None) is not None:
        model.hinge_loss_seed = loss_fn.seed_generator  # threaded through the jitted step (see train.py)
    model.compile(optimizer=keras.optimizers.Adam(float(learning_rate)), loss=loss_fn)
    batches = shuffled_batches(images, labels, int(batch_size), int(seed), rows=indices, dtype="uint8")
    state = _load_finetune_checkpoint(partial, options, model)

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            batches.set_epoch(epoch)

        def on_epoch_end(self, epoch, logs=None):
            state["epoch"] = epoch + 1
            state["loss"].append(float((logs or {}).get("loss", np.nan)))
            _write_finetune_checkpoint(partial, options, model, state)

    if verbose:
        print(f"fine-tuning backbone blocks {', '.join(trainable_blocks)} and the run's head "
              f"on {len(indices)} images", flush=True)
    if state["epoch"] < epochs:
        model.fit(batches, epochs=int(epochs), initial_epoch=state["epoch"], shuffle=False,
                  callbacks=[EpochEnd(), *callbacks], verbose=verbose)

    settings = {**run.settings, "backbone_weights": WEIGHTS_FILE,
                "finetune": {"from": str(Path(run_dir).resolve()), "blocks": trainable_blocks,
                             "epochs": int(epochs), "learning_rate": float(learning_rate),
                             "batch_size": int(batch_size), "images": int(len(indices)), "seed": int(seed)}}
    history = {"finetune_loss": state["loss"], "source_history": run.history}
    tuned = DeviseModel(run.method, run.model, run.class_names, run.label_vectors, settings, history,
                        class_columns=run.class_columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a run folder is an ordinary folder
    try:
        _save_weights(features_model, tmp / WEIGHTS_FILE)
        tuned.save(tmp)  # model.keras (the fine-tuned head), labels.npz, history.json, settings.json
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(partial, ignore_errors=True)
    return load_model_folder(out)


def _write_finetune_checkpoint(partial: Path, options, model, state) -> None:
    """One atomic file: every variable of the end-to-end model (the augmentation seeds and the loss's random
    state, attached as model.hinge_loss_seed, included), the optimizer and the epoch count, beside the
    options it belongs to."""
    # model.variables, not get_weights(): the augmentation layers' seed states are variables, not weights
    arrays = {f"variable_{i}": np.asarray(v.value) for i, v in enumerate(model.variables)}
    arrays.update(optimizer_arrays(model))
    atomic_save_npz(partial / "checkpoint.npz", options=json.dumps(options), state=json.dumps(state), **arrays)


def _load_finetune_checkpoint(partial: Path, options, model) -> dict:
    """The state after the last finished epoch of an interrupted fine-tuning with the same options
    (its variables and optimizer restored into model), else a fresh state."""
    path = partial / "checkpoint.npz"
    if not path.is_file():
        return {"epoch": 0, "loss": []}
    try:  # read whole before any variable is assigned: a damaged file must not leave half of it restored
        with np.load(path) as npz:
            data = {name: npz[name] for name in npz.files}
        saved, state = json.loads(str(data["options"])), json.loads(str(data["state"]))
        variables = [data[f"variable_{i}"] for i in range(len(model.variables))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"{path}: damaged checkpoint ({type(exc).__name__}: {exc}); fine-tuning starts again",
                      stacklevel=2)
        return {"epoch": 0, "loss": []}
    if saved != options:
        changed = ", ".join(sorted(k for k in options if saved.get(k) != options[k]))
        raise DeviseError(f"{partial} holds an interrupted fine-tuning with other options ({changed}): "
                          f"delete it, or rerun with the same options to resume")
    for variable, value in zip(model.variables, variables):
        variable.assign(value)
    restore_optimizer(model, data)
    print(f"resuming the fine-tuning in {partial} after epoch {state['epoch']}", flush=True)
    return state

