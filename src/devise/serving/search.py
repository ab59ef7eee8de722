"""Image search in the label space: a FAISS index of image embeddings, queried by text or by image.

`build_index(folder_or_paths, model, out)` embeds images with a DeviseModel (devise.models.model: a preset, a run
folder or a loaded model) and stores, in the folder `out`:
- meta.json: the model (a preset's name, or a run's resolved folder, with a digest of its files), its
  vectors, the image decode policy, the index kind, the image paths with their size, mtime, device and inode,
  and the generation;
- index-<gen>.faiss and embeddings-<gen>.npy (the unit embeddings, kept so adding images never
  re-embeds the old ones).
meta.json is replaced last (atomically), so a killed run leaves the previous index intact; it lists the
sizes of the generation's files, which load_index checks (with the embeddings' shape and finiteness) to name
a damaged file in one line. One writer at a time (devise.storage.locked on the folder): a second build into
the same --out waits, then adds to what the first wrote. Rebuilding into
the same folder embeds only new or changed files, unless what the old embeddings came from changed (the
model folder's files, the decode policy): then it embeds every file again and says why.

The index files are written from rows, streaming, by devise.serving.index_build: exact inner-product search
(IndexFlatIP) below APPROX_THRESHOLD images, HNSW above it; with a memory cap, a compressed IVF-PQ index
where those would not fit, its recall@10 against exact search stored in meta.json. Rows may also come from
a shard folder another engine wrote (devise.data.shards). Scores are cosines (all vectors are unit-norm).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devise.storage import atomic_write, check_files, file_entries, locked, remove
from devise.errors import DeviseError
from devise.serving.index_build import APPROX_THRESHOLD, apply_search_params, build_index_files, concat_rows, parse_memory
from devise.serving.index_build import file_stamp as _stamp
from devise.serving.index_build import rows_from_arrays, rows_from_index_file, rows_from_shards
from devise.data.images import POLICY_VERSION as IMAGE_POLICY_VERSION
from devise.data.images import expand_image_paths, load_image
from devise.models.model import load, model_files_stamp, model_name
from devise.models.presets import DEFAULT_MODEL
from devise.data.shards import check_complete, load_plan, paths_digest, read_member
from devise.labels.vectors import embed_labels, load_vectors

INDEX_VERSION = 1
RAY_SHARDS = "shards"  # the folder in an index folder where a --ray build's shards wait for the index


@dataclass
class ImageIndex:
    """A loaded image index: paths[i] has embeddings[i]; `index` is the FAISS index over them."""

    folder: Path
    paths: list[str]
    embeddings: np.ndarray
    index: object  # faiss.Index
    model: str
    vectors_spec: str
    kind: str
    stamps: list[list[int]]
    recall: dict | None = None  # {"recall@10": .., ...} against exact search, measured when it was built

    def __len__(self) -> int:
        return len(self.paths)


def _read_meta(folder: Path) -> dict | None:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != INDEX_VERSION:
            raise ValueError(f"version {meta.get('version')}")
        return meta
    except (OSError, ValueError) as exc:
        raise DeviseError(f"{meta_file}: not a devise image index ({exc})") from None


def load_index(folder: str | os.PathLike) -> ImageIndex:
    """Open an index folder written by build_index; a damaged one is a DeviseError naming the file."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise DeviseError(f"{folder}: no image index here (make one with 'devise index FOLDER --out {folder}')")
    try:
        embeddings, index = _read_generation(folder, meta)
    except DeviseError:
        newer = _read_meta(folder)  # a build finished meanwhile and removed the generation meta.json named
        if newer is None or newer["generation"] == meta["generation"]:
            raise
        meta = newer
        embeddings, index = _read_generation(folder, meta)
    return ImageIndex(folder, meta["paths"], embeddings, index, meta["model"], meta["vectors"], meta["kind"],
                      meta["stamps"], meta.get("recall"))


def _read_generation(folder: Path, meta: dict):
    """(embeddings, FAISS index) of meta's generation, checked against meta: sizes, shape, finite rows."""
    import faiss

    gen, count = meta["generation"], len(meta["paths"])
    check_files(folder, meta.get("files", {}), "meta.json", hashes=False)  # indexes before it: no sizes
    try:
        embeddings = np.load(folder / f"embeddings-{gen}.npy", mmap_mode="r")  # read where used, never whole
        index = faiss.read_index(str(folder / f"index-{gen}.faiss"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise DeviseError(f"{folder}: index files damaged ({exc.__class__.__name__}: {exc}); rebuild it") from None
    if index.ntotal != count or embeddings.shape != (count, meta.get("dim", embeddings.shape[-1])):
        raise DeviseError(f"{folder}: index files disagree with meta.json; rebuild the index")
    if not all(np.isfinite(embeddings[lo:lo + 65536]).all() for lo in range(0, count, 65536)):  # in blocks
        raise DeviseError(f"{folder / f'embeddings-{gen}.npy'}: damaged (non-finite values); rebuild the index")
    apply_search_params(index, meta["kind"], meta.get("params", {}))
    return embeddings, index


def build_index(folder_or_paths=None, model=DEFAULT_MODEL, out: str | os.PathLike = "devise.index", *,
                approx_threshold: int = APPROX_THRESHOLD, progress: bool = True,
                vectors: str | None = None, memory_cap: int | str | None = None,
                shards: str | os.PathLike | None = None, ray: str | None = None) -> ImageIndex:
    """Embed images (a folder, searched recursively, or a list of files) into an index folder `out`.

    If `out` already holds an index of the same model and vectors, only files that are new or changed
    since are embedded (all of them if the model folder's files or the decode policy changed); files that
    no longer exist are dropped. Removed and unreadable files, and a full re-embedding, are reported in
    one warning. model: a preset name, a trained run folder or a DeviseModel; vectors: a preset's label space.
    memory_cap ('2GB' or bytes): the index kept within it, compressed where exact search would not fit
    (devise.serving.index_build). shards: instead of images, a complete shard folder (devise.data.shards) whose rows
    were embedded elsewhere; its model and label space are the index's, its rows replace older ones.
    ray: "auto" or a Ray cluster's address: the new files are embedded on Ray (devise.data.ray_engine) into a
    shard folder under out/shards (a killed run resumes from its finished shards) that the builder streams
    like `shards`; removed once the index is written.
    A second build into the same `out` waits for the first (a lock), then adds to its index.
    """
    out = Path(out)
    _check_out(out)  # before any embedding: a bad --out must not cost the whole run
    if ray is not None:
        if shards is not None:
            raise DeviseError("give images to embed on Ray, or a shard folder already embedded, not both")
        from devise.data.ray_engine import require_ray

        require_ray()  # without the extra: one line saying how to install it, before any work
    with locked(out):
        return _build_index(folder_or_paths, model, out, approx_threshold, progress, vectors, memory_cap, shards,
                            ray)


def _build_index(folder_or_paths, model, out: Path, approx_threshold: int, progress: bool, vectors, memory_cap,
                 shards, ray) -> ImageIndex:
    memory_cap = parse_memory(memory_cap)
    skipped: list[str] = []  # entries the walker left out: reported in this function's one warning
    if shards is not None:
        plan = check_complete(shards)
        model_id, vectors_spec, dim = plan["model"], plan["vectors"], plan["dim"]
        listing = [p for k in range(len(plan["shards"])) for p in read_member(shards, k, "paths", plan).tolist()]
    else:
        sources = [folder_or_paths] if isinstance(folder_or_paths, (str, os.PathLike)) else list(folder_or_paths)
        listing = [str(Path(p).resolve()) for p in expand_image_paths(sources, skipped)]
        model_id = model_name(model)  # devise.load's meaning of the name: a preset's, or a resolved folder
    old, old_meta, damaged = None, _read_meta(out), None
    if old_meta is not None:
        try:
            old = load_index(out)
        except DeviseError as exc:  # damaged on disk: said in the warning below, and built again
            damaged = str(exc)
    if old is not None:
        if old.model != model_id:
            raise DeviseError(f"{out}: index was built with model '{old.model}', not '{model_id}'; "
                              "use another --out or the same --model")
    if shards is None:
        model = load(model, vectors)
        model.check_open_vocabulary()
        vectors_spec, dim = model.vectors_spec, model.dim
    # What every embedding depends on besides its file: if any of it changed, no old row can be kept.
    source = {"model_files": plan["model_files"], "image_policy": plan["image_policy"]} if shards is not None \
        else {"model_files": model_files_stamp(model_id), "image_policy": IMAGE_POLICY_VERSION}
    stale_because = []
    if old is not None:
        if old.vectors_spec != vectors_spec:
            raise DeviseError(f"{out}: index was built with vectors '{old.vectors_spec}', not "
                              f"'{vectors_spec}'; use another --out or the same --vectors")
        stale_because = [{"model_files": "model folder files", "image_policy": "image decode policy"}[k]
                         for k, v in source.items() if old_meta.get(k) != v]

    # Keep old rows whose file still exists unchanged; embed the rest (old files that changed included).
    keep_paths, keep_rows, keep_stamps, removed, changed = [], [], [], [], []
    replaced = set(listing) if shards is not None else set()  # a shard's row wins over an older one
    if old is not None:
        for i, (path, stamp) in enumerate(zip(old.paths, old.stamps)):
            now = _stamp(path)
            if now is None:
                removed.append(path)
            elif now == stamp and not stale_because and path not in replaced:
                keep_paths.append(path)
                keep_rows.append(i)
                keep_stamps.append(stamp)
            elif path not in replaced:
                changed.append(path)
    if shards is not None:
        new_rows, valid = rows_from_shards(shards), _shard_valid(shards, plan)
        todo, removed = listing, removed + changed  # changed files not in the shards cannot be embedded here
    else:
        known = set(keep_paths)
        todo = list(dict.fromkeys([*changed, *(p for p in listing if p not in known)]))
        with warnings.catch_warnings(record=True):  # load_images' own warning: reported below in one line
            warnings.simplefilter("always")
            if ray is not None and todo:
                new_rows, valid = _embed_on_ray(todo, model, out, ray, progress)
            else:
                new_emb, valid = model.encode_paths(todo, progress=progress, cache=True) if todo else \
                    (np.zeros((0, dim), np.float32), np.zeros(0, bool))
                new_rows = rows_from_arrays([p for p, ok in zip(todo, valid) if ok], new_emb[valid])
    unreadable = [p for p, ok in zip(todo, valid) if not ok]
    new_paths = [p for p, ok in zip(todo, valid) if ok]

    old_file = out / f"embeddings-{old_meta['generation']}.npy" if old is not None else None
    rows = concat_rows(rows_from_index_file(old_file, keep_rows, keep_paths, keep_stamps) if keep_rows else None,
                       new_rows)
    rows.dim = rows.dim or int(dim)
    out.mkdir(parents=True, exist_ok=True)
    gen = old_meta["generation"] + 1 if old_meta is not None else 1
    built = build_index_files(out, gen, rows, memory_cap=memory_cap, approx_threshold=approx_threshold,
                              progress=progress)
    meta = {"version": INDEX_VERSION, "generation": gen, "model": model_id, "vectors": vectors_spec,
            **source, "dim": int(dim), "kind": built.kind, "params": built.params, "recall": built.recall,
            "memory_cap": memory_cap, "count": len(built.paths), "paths": built.paths, "stamps": built.stamps,
            "files": file_entries(out, [f"embeddings-{gen}.npy", f"index-{gen}.faiss"], hashes=False)}
    atomic_write(out / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    for stale in (f"embeddings-{gen - 1}.npy", f"index-{gen - 1}.faiss"):
        (out / stale).unlink(missing_ok=True)
    if ray is not None:
        remove(out / RAY_SHARDS)  # the index holds the rows now

    problems = []
    if damaged:
        problems.append(f"the old index was unreadable, so it was built again from every image ({damaged})")
    if stale_because:
        problems.append(f"every image embedded again ({len(new_paths)}): not the same {' or '.join(stale_because)} "
                        "as when the index was built")
    if skipped:
        problems.append(f"{len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not readable image "
                        f"files skipped: {'; '.join(skipped)}")
    if removed:
        problems.append(f"{len(removed)} file(s) no longer exist and were dropped: {', '.join(removed)}")
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable file(s) skipped: {', '.join(unreadable)}")
    if problems:
        warnings.warn("; ".join(problems), stacklevel=3)
    result = load_index(out)
    result.added, result.removed, result.unreadable, result.skipped = new_paths, removed, unreadable, skipped
    return result


def _shard_valid(folder, plan: dict) -> np.ndarray:
    """The valid flags of a shard folder's rows, in order (its vectors stay on disk)."""
    return np.concatenate([read_member(folder, k, "valid", plan) for k in range(len(plan["shards"]))] or
                          [np.zeros(0, bool)])


def _embed_on_ray(paths: list[str], model, out: Path, address: str, progress: bool):
    """(Rows, valid) of `paths` embedded on a Ray cluster into out/shards/<digest of the list> (one folder per
    list of files: a rerun of a killed build resumes it), streamed by the builder like a --shards folder."""
    from devise.data.ray_engine import embed_on_ray

    folder = out / RAY_SHARDS / paths_digest(paths)[:16]
    embed_on_ray(paths, model, folder, address=address, progress=progress)
    return rows_from_shards(folder), _shard_valid(folder, load_plan(folder))


def _check_out(out: Path) -> None:
    """DeviseError unless the index folder `out` exists or can be made (an ordinary file there is refused)."""
    if os.path.lexists(out) and not out.is_dir():
        raise DeviseError(f"{out}: exists and is not a folder (an index is a folder); choose another --out")
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DeviseError(f"{out}: cannot make the index folder: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DeviseError(f"{out}: cannot make the index folder: {existing} is not writable")


def embed_text(text: str, vectors) -> np.ndarray:
    """A text query -> unit (1, D) vector by the label rule (multi-word queries as phrases).

    vectors: a vectors spec, or vectors already loaded (a server keeps them instead of loading per query)."""
    text = " ".join(str(text).split())
    if not text:
        raise DeviseError("empty text query")
    vectors = load_vectors(vectors) if isinstance(vectors, (str, os.PathLike)) else vectors
    try:
        emb = embed_labels([text], vectors)
    except DeviseError:
        raise DeviseError(f"'{text}': no vector for this query in {vectors.name} (unknown words)") from None
    return np.ascontiguousarray(emb.matrix, np.float32)


def search(index, text: str | None = None, image: str | os.PathLike | None = None, top_k: int = 10,
           model=None, vectors=None) -> dict:
    """Nearest images to a text or an image query: {"query": .., "results": [{"image": PATH, "score": ..}]}.

    index: an ImageIndex or its folder; model: a DeviseModel for image queries (default: the index's own,
    in the label space it was built in); vectors: the index's label vectors, loaded, for text queries
    (else loaded for this query).
    """
    if (text is None) == (image is None):
        raise DeviseError("give exactly one query: a text or an image")
    if top_k < 1:
        raise DeviseError(f"top_k must be at least 1, not {top_k}")
    index = index if isinstance(index, ImageIndex) else load_index(index)
    if text is not None:
        query, vector = text, embed_text(text, vectors if vectors is not None else index.vectors_spec)
    else:
        model = load(model if model is not None else index.model, index.vectors_spec)  # the space it was built in
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vector, valid = model.encode_paths([str(image)])
        if not valid[0]:
            load_image(image, model.backbone.image_size)  # raises the DeviseError naming the problem
        query = str(image)
    if vector.shape[1] != index.embeddings.shape[1]:
        raise DeviseError(f"query is {vector.shape[1]}-d but the index is {index.embeddings.shape[1]}-d")
    if len(index) == 0:
        return {"query": query, "results": []}
    scores, ids = index.index.search(np.ascontiguousarray(vector, np.float32), min(top_k, len(index)))
    results = [{"image": index.paths[i], "score": round(float(s), 6)} for s, i in zip(scores[0], ids[0]) if i >= 0]
    return {"query": query, "results": results}


def format_results(result: dict) -> str:
    lines = [f"query: {result['query']}"]
    for rank, hit in enumerate(result["results"], 1):
        lines.append(f"  {rank:3d}. {hit['score']:+.3f}  {hit['image']}")
    return "\n".join(lines)
