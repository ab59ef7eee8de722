"""Embedding shards: a collection's image embeddings as numbered files, the one format every engine writes
(in-process, Ray) and the index builder reads (devise.serving.index_build).

A shard folder holds shards.json, the plan, written before any shard runs: the model, its label space and
dimension, the decode policy, the number of rows, the rows per shard, each shard's name/first row/rows and
the SHA-256 of the input path list. Shard k is `shard-{k:05d}.npz` with arrays `paths` (str (n,)), `vectors`
(float32 (n, D), unit rows, zero where invalid) and `valid` (bool (n,)), written atomically only when the
shard is complete, so a shard file that exists is a finished shard. A rerun of the same plan keeps every
readable shard of the right size and computes only the others (`missing_shards`); another plan in the same
folder is refused (one line), never mixed. Two writers of one shard (a retried task) write the same rows and
the atomic rename lets the last one win, so shards need no lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from devise.errors import DeviseError
from devise.data.images import POLICY_VERSION as IMAGE_POLICY_VERSION
from devise.storage import atomic_save_npz, atomic_write_json, locked

PLAN = "shards.json"
SHARDS_VERSION = 1
SHARD_ROWS = 10_000  # rows per shard unless told: ~15 MB of 384-d vectors, a few minutes of CPU embedding
# The fields that say what the rows are: a plan in the folder that differs in any of them is another job.
PLAN_IDENTITY = ("version", "model", "vectors", "dim", "image_policy", "model_files", "count", "shard_rows",
                 "paths_sha256")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def paths_digest(paths) -> str:
    return hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()


def _model_fields(model) -> dict:
    """The plan's model fields for a DeviseModel, or a dict {"model", "vectors", "dim"} (rows made without
    a devise model, e.g. the benchmark's synthetic ones; model_files then None)."""
    if isinstance(model, dict):
        return {"model": str(model["model"]), "vectors": str(model["vectors"]), "dim": int(model["dim"]),
                "model_files": model.get("model_files")}
    from devise.models.model import model_files_stamp, model_name

    name = model_name(model)
    return {"model": name, "vectors": model.vectors_spec, "dim": int(model.dim), "model_files": model_files_stamp(name)}


def plan_shards(paths, model, folder: str | os.PathLike, shard_rows: int = SHARD_ROWS) -> dict:
    """Write (or find) the plan for embedding `paths` with `model` into shard folder `folder`; returns it.

    The same plan already there is kept (its finished shards stay); another one is a DeviseError."""
    folder = Path(folder)
    paths = [str(p) for p in paths]
    if shard_rows < 1:
        raise DeviseError(f"shard_rows must be at least 1, not {shard_rows}")
    fields = _model_fields(model)
    plan = {"version": SHARDS_VERSION, "model": fields["model"], "vectors": fields["vectors"], "dim": fields["dim"],
            "image_policy": IMAGE_POLICY_VERSION, "model_files": fields["model_files"], "count": len(paths),
            "shard_rows": int(shard_rows),
            "shards": [{"name": shard_name(k), "first": first, "rows": min(shard_rows, len(paths) - first)}
                       for k, first in enumerate(range(0, len(paths), shard_rows))],
            "paths_sha256": paths_digest(paths)}
    with locked(folder / PLAN):  # two planners of one folder: the second finds the first's plan
        old = _read_plan(folder) if (folder / PLAN).exists() else None
        if old is None:
            atomic_write_json(folder / PLAN, plan, indent=1)
            return plan
    differs = [k for k in PLAN_IDENTITY if old.get(k) != plan[k]]
    if differs:
        raise DeviseError(f"{folder}: holds shards of another job (its {', '.join(differs)} differ"
                          f"{'' if 'paths_sha256' not in differs else ': other images'}); use another shard folder")
    return old


def _read_plan(folder: Path) -> dict:
    path = folder / PLAN
    try:
        plan = json.loads(path.read_text())
        if plan.get("version") != SHARDS_VERSION:
            raise ValueError(f"version {plan.get('version')}")
        plan["shards"], plan["dim"]  # noqa: B018 (the fields every reader needs)
        return plan
    except FileNotFoundError:
        raise DeviseError(f"{folder}: no {PLAN} here (not a shard folder, or its job was never planned)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeviseError(f"{path}: not a devise shard plan ({exc})") from None


def load_plan(folder: str | os.PathLike) -> dict:
    return _read_plan(Path(folder))


def _shard_shape(file: Path) -> tuple | None:
    """(rows, dim) of a shard file from its array headers only (no vectors read); None if it is missing,
    unreadable or inconsistent."""
    try:
        with zipfile.ZipFile(file) as archive:
            shapes = {}
            for key in ("paths", "vectors", "valid"):
                with archive.open(f"{key}.npy") as fh:
                    major = np.lib.format.read_magic(fh)[0]
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                        np.lib.format.read_array_header_2_0
                    shapes[key] = read_header(fh)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    n = shapes["paths"][0] if len(shapes["paths"]) == 1 else None
    if n is None or shapes["valid"] != (n,) or len(shapes["vectors"]) != 2 or shapes["vectors"][0] != n:
        return None
    return n, shapes["vectors"][1]


def missing_shards(folder: str | os.PathLike) -> list[int]:
    """The shard numbers still to compute: no file, an unreadable one, or one of the wrong size."""
    folder = Path(folder)
    plan = _read_plan(folder)
    return [k for k, shard in enumerate(plan["shards"])
            if _shard_shape(folder / shard["name"]) != (shard["rows"], plan["dim"])]


def write_shard(folder: str | os.PathLike, k: int, paths, vectors, valid) -> None:
    """Write finished shard k (atomically). Its rows must be the plan's: their number, the model's dim."""
    folder = Path(folder)
    plan = _read_plan(folder)
    if not 0 <= k < len(plan["shards"]):
        raise DeviseError(f"{folder}: no shard {k} in its plan ({len(plan['shards'])} shards)")
    shard = plan["shards"][k]
    paths = np.asarray([str(p) for p in paths], dtype=str)
    vectors = np.asarray(vectors, np.float32)
    valid = np.asarray(valid, bool)
    if len(paths) != shard["rows"] or vectors.shape != (shard["rows"], plan["dim"]) or valid.shape != (shard["rows"],):
        raise DeviseError(f"{folder / shard['name']}: {len(paths)} paths, vectors {vectors.shape}, valid "
                          f"{valid.shape}; the plan wants {shard['rows']} rows of {plan['dim']}")
    atomic_save_npz(folder / shard["name"], paths=paths, vectors=vectors, valid=valid)


def check_complete(folder: str | os.PathLike) -> dict:
    """The plan of a shard folder whose every shard is written; else a DeviseError naming what is missing."""
    folder = Path(folder)
    plan = _read_plan(folder)
    missing = missing_shards(folder)
    if missing:
        names = ", ".join(plan["shards"][k]["name"] for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DeviseError(f"{folder}: {len(missing)} of {len(plan['shards'])} shards not written yet ({names}); "
                          "run the embedding job again to finish them")
    return plan


def read_shard(folder: str | os.PathLike, k: int, plan: dict | None = None):
    """Shard k as (paths list, vectors float32 (n, D), valid bool (n,))."""
    folder = Path(folder)
    plan = plan or _read_plan(folder)
    shard = plan["shards"][k]
    file = folder / shard["name"]
    try:
        with np.load(file, allow_pickle=False) as data:
            paths, vectors, valid = data["paths"].tolist(), data["vectors"], data["valid"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DeviseError(f"{file}: unreadable shard ({exc}); delete it and run the embedding job again") from None
    if vectors.shape != (shard["rows"], plan["dim"]) or len(paths) != shard["rows"] or valid.shape != (shard["rows"],):
        raise DeviseError(f"{file}: {len(paths)} rows of {vectors.shape[-1]}, the plan says {shard['rows']} of "
                          f"{plan['dim']}; delete it and run the embedding job again")
    return paths, np.asarray(vectors, np.float32), np.asarray(valid, bool)


def read_shards(folder: str | os.PathLike):
    """Every shard of a complete folder, in order: an iterator of (paths, vectors, valid), one shard in
    memory at a time."""
    plan = check_complete(folder)
    for k in range(len(plan["shards"])):
        yield read_shard(folder, k, plan)


def read_member(folder: str | os.PathLike, k: int, key: str, plan: dict | None = None) -> np.ndarray:
    """Only shard k's `paths` or `valid` (the vectors stay on disk): what a builder will get, up front."""
    plan = plan or _read_plan(Path(folder))
    file = Path(folder) / plan["shards"][k]["name"]
    try:
        with np.load(file, allow_pickle=False) as data:
            return data[key]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DeviseError(f"{file}: unreadable shard ({exc}); delete it and run the embedding job again") from None


def embed_shards(paths, model, folder: str | os.PathLike, shard_rows: int = SHARD_ROWS,
                 progress: bool = True) -> dict:
    """The in-process engine: plan `paths` into `folder` and embed every shard not written yet with
    `model` (a DeviseModel; features through the on-disk feature cache). Returns the plan."""
    import warnings

    from tqdm import tqdm

    paths = [str(p) for p in paths]
    plan = plan_shards(paths, model, folder, shard_rows)
    todo = missing_shards(folder)
    for k in tqdm(todo, desc="shards", unit="shard", disable=not progress or len(todo) < 2):
        shard = plan["shards"][k]
        part = paths[shard["first"]:shard["first"] + shard["rows"]]
        with warnings.catch_warnings():  # unreadable files are rows with valid False, read by the builder
            warnings.simplefilter("ignore")
            vectors, valid = model.encode_paths(part, progress=progress and len(todo) == 1, cache=True)
        write_shard(folder, k, part, vectors, valid)
    return plan
