"""Backbone features computed once and cached on disk.

Two caches under the data home, both chunked, resumable and finished with an atomic rename:
- the image store: every image decoded and resized ONCE into a memory-mapped uint8 (N, S, S, 3) array
  (decoding is the bottleneck on a GPU; fine-tuning epochs and other backbones at the same size reuse it);
- the feature cache: pooled features (N, D) float32 and ImageNet logits (N, 1000) where the backbone has a
  classifier.
A chunk is marked done only after its data is flushed, so a run killed with SIGKILL resumes from the
first unfinished chunk. Cache keys cover the backbone (weights, preprocessing) and the exact image list
(path, size, mtime), so a stale cache is never reused.

Both follow devise.storage's protocol: one writer per cache folder (`locked`: a second run of the same
images waits, then reads what the first wrote), the finished folder published whole with a manifest of its
files, free space checked before the memory-mapped files are made, and a reader that finds a damaged entry
(files of the wrong size, unreadable arrays, non-finite features) says so in one line and computes it again.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from devise import defaults
from devise.assets import data_home
from devise.errors import DeviseError
# The decode/resize policy is versioned where it lives (images.py): when it changes, old stores stop matching.
from devise.data.images import POLICY_VERSION as IMAGE_POLICY_VERSION
from devise.data.images import load_images
from devise.data.pipeline import Decoder, choose_decoder, decode_chunks, forward_chunks, padded_batches
from devise.storage import ChunkedArrays, check_manifest, locked, remove
from devise.runtime import cached_forward, default_batch_size, device_count, gather_from_hosts, process_index_and_count

# Bump when the feature cache's layout changes (v2: its own valid mask, so the store may be deleted).
FEATURES_VERSION = "v2"


@dataclass
class FeatureSet:
    """Cached backbone outputs for a list of images (rows in the order of `paths`)."""

    features: np.ndarray  # (N, D) float32, memory-mapped
    logits: np.ndarray | None  # (N, 1000) float32 ImageNet logits, or None
    paths: list[str]
    valid: np.ndarray  # (N,) bool: False where the image could not be read (its row is meaningless)
    backbone: str
    folder: Path


def images_key(paths: list[str], size: int, decoder_policy: str = "") -> str:
    """Hash of the image list and each file's size and mtime, plus the decode policy (and the decoder's
    own mark where it does not give the CPU path's exact pixels: JPEGs decoded on the GPU)."""
    digest = hashlib.sha256(f"{IMAGE_POLICY_VERSION}{decoder_policy}|{size}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"|{p}|missing".encode())
    return digest.hexdigest()[:20]


def _open_finished(folder: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict | None:
    """The arrays of a finished cache folder (memory-mapped; `optional` ones where present), or None when it is
    not there. A damaged one (a file missing or of the wrong size by its manifest, an array numpy cannot
    read) is reported in one warning and removed, and None returned: the caller computes it again."""
    if not (folder / "meta.json").exists():
        return None
    try:
        check_manifest(folder, hashes=False)  # sizes only: a hash of a 1 GB store on every read costs seconds
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
        arrays.update({name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in optional
                       if (folder / f"{name}.npy").exists()})
    except (DeviseError, ValueError, OSError) as exc:
        _discard_damaged(folder, exc)
        return None
    return arrays


def _discard_damaged(folder: Path, why) -> None:
    warnings.warn(f"{folder}: damaged cache ({why}); computing it again", stacklevel=3)
    remove(folder)


def image_store_folder(paths: list[str], size: int, decoder_policy: str = "") -> Path:
    """Where the uint8 store of these images at this size lives (known before it is built)."""
    return data_home() / "images" / f"{size}px-{images_key(paths, size, decoder_policy)}"


def _finished_store(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    arrays = _open_finished(folder, ("images", "valid"))
    return None if arrays is None else (arrays["images"], np.asarray(arrays["valid"]))


def _decode_chunks(paths: list[str], size: int, chunk_size: int, decoder: Decoder, progress: bool):
    """Fill the image store chunk by chunk; yield (lo, hi, images, valid[lo:hi]) once rows lo:hi are on disk.

    devise.data.pipeline.decode_chunks decodes the next chunk (straight into the memory-mapped store) while the
    caller uses the one just yielded. Chunks already done by a killed run are yielded at once. The store
    is finished (renamed into place) after the last chunk.
    """
    folder = image_store_folder(paths, size, decoder.policy)
    n = len(paths)
    n_chunks = -(-n // chunk_size)
    store = ChunkedArrays(folder, {"images": (n, size, size, 3), "valid": (n,)},
                           {"images": "uint8", "valid": "bool"}, n_chunks)
    images, valid = store.arrays["images"], store.arrays["valid"]
    if store.done:
        tqdm.write(f"resuming image store: {len(store.done)} of {n_chunks} chunks already done")
    bad: list[str] = []
    bar = tqdm(total=n, initial=sum(min(chunk_size, n - c * chunk_size) for c in store.done),
               desc="decoding images", unit="img", disable=not progress)
    decoded = decode_chunks(paths, size, chunk_size, decoder, images=images,
                            store_file=str(store.partial / "images.npy"), skip=set(store.done), bar=bar)
    try:
        for c in range(n_chunks):
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            if c not in store.done:
                _, _, _, _, valid[lo:hi], errors = next(decoded)
                bad += errors
                store.mark_done(c)
            yield lo, hi, images, valid[lo:hi]
    finally:
        decoded.close()  # cancels what it had queued, when left by an error or an abandoned generator
        bar.close()
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s): " + "; ".join(bad), stacklevel=3)
    elif not valid.all():  # resumed run: the warning was given before the crash; repeat the count
        warnings.warn(f"{int((~np.asarray(valid)).sum())} image(s) in this list are unreadable and skipped",
                      stacklevel=3)
    store.finish({"size": size, "count": n, "policy": IMAGE_POLICY_VERSION, "paths": paths})


def build_image_store(paths: list[str], size: int = 224, *, chunk_size: int = 512, workers: int | None = None,
                      decode: str = "auto", progress: bool = True) -> tuple[np.ndarray, np.ndarray, Path]:
    """Decode every image once into a memory-mapped uint8 store: (images (N,S,S,3), valid (N,), folder).

    decode: "auto" (default: JPEGs on the GPU where possible, else the faster CPU mode here), "gpu",
    "threads" or "processes" (spawned; a script that asks for them needs the `if __name__ == "__main__":`
    guard; "auto" picks them only for a script that has it), `workers` of them (default: one per core).
    See devise.data.pipeline.choose_decoder.
    Unreadable images are reported in ONE warning that lists them, and marked invalid; the run goes on.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise DeviseError("no images to decode (empty image list)")
    decoder = choose_decoder(decode, workers, say=progress)
    folder = image_store_folder(paths, size, decoder.policy)
    try:
        if _finished_store(folder) is None:
            for _ in _store_chunks(paths, size, chunk_size, decoder, progress):
                pass
    finally:
        decoder.close()
    images, valid = _finished_store(folder)
    return images, valid, folder


def _store_chunks(paths: list[str], size: int, chunk_size: int, decoder: Decoder, progress: bool):
    """(lo, hi, images, valid[lo:hi]) per chunk of the image store: decoded here (_decode_chunks) while this
    process holds the store's lock, or read from the finished store, also when another process finished it
    while this one waited for the lock."""
    folder = image_store_folder(paths, size, decoder.policy)
    with locked(folder):
        stored = _finished_store(folder)
        if stored is None:
            yield from _decode_chunks(paths, size, chunk_size, decoder, progress)
            return
        for lo in range(0, len(paths), chunk_size):
            yield lo, min(len(paths), lo + chunk_size), stored[0], stored[1][lo:lo + chunk_size]


def backbone_forward(backbone):
    """One compiled function: uint8 batch -> (features, logits or None), sharded when several devices are in use.

    runtime.cached_forward of the backbone's forward_model (built once per backbone): the compiled program
    is kept on that model for the current distribution, so it goes away with the backbone (a freed
    fine-tuned backbone's id may be reused: never a module dict keyed by id).
    """
    forward = cached_forward(backbone.forward_model)
    if backbone.classifier is None:
        return lambda x, **kwargs: (forward(x, **kwargs), None)
    return lambda x, **kwargs: tuple(forward(x, **kwargs))


def forward_batch_size(batch_size: int | None = None) -> int:
    """Images per forward batch (default: runtime.default_batch_size), a multiple of the devices in use."""
    batch_size = batch_size or default_batch_size()
    return -(-batch_size // device_count()) * device_count()  # split evenly across devices


def forward_arrays(backbone, images: np.ndarray, batch_size: int | None = None):
    """Decoded uint8 (N, S, S, 3) -> (features (N, F), ImageNet logits (N, 1000) or None), through the
    pipeline in the padded batches extract_features runs (the same compiled shape: the same numbers).
    For callers that decode elsewhere (devise.data.ray_engine's model actors)."""
    features = np.zeros((len(images), backbone.feature_dim), np.float32)
    logits = np.zeros((len(images), 1000), np.float32) if backbone.classifier is not None else None

    def write(start, feats, logs):
        features[start:start + len(feats)] = feats
        if logits is not None:
            logits[start:start + len(feats)] = logs

    forward_chunks([(None, padded_batches(0, images, forward_batch_size(batch_size)))], backbone_forward(backbone),
                   write)
    return features, logits


def extract_features(dataset_or_paths, backbone=defaults.TRAIN_BACKBONE, *, batch_size: int | None = None,
                     chunk_size: int = 512, decode: str = "auto", progress: bool = True,
                     engine=None) -> FeatureSet:
    """Pooled features (and ImageNet logits) for a dataset or a list of image paths, cached on disk.

    `backbone` is a name or a Backbone from devise.models.backbones.load_backbone. Images are decoded once into
    the uint8 store while the forward runs on the chunk decoded before. A second call with the same
    images and backbone reads the cache (the image store may be deleted by then: the cache keeps its own
    valid mask); a killed run resumes at the first unfinished chunk of either. decode: as in
    build_image_store. engine: None (here), or engine(paths, backbone, arrays, chunks, mark_done) that
    fills the cache's arrays at rows lo:lo+rows of each chunk c -> (lo, rows) still to do elsewhere and
    calls mark_done(c) after each (devise.data.ray_engine.extract_features_on_ray); no image store is written.
    """
    # Here, not at the top: decoding processes import this module, and must not start Keras and JAX.
    from devise.models.backbones import load_backbone

    paths = [str(p) for p in getattr(dataset_or_paths, "paths", dataset_or_paths)]
    if not paths:
        raise DeviseError("no images to compute features for (empty image list)")
    bb = load_backbone(backbone) if isinstance(backbone, str) else backbone
    decoder = choose_decoder(decode, say=progress and engine is None)
    store_folder = image_store_folder(paths, bb.image_size, decoder.policy)
    folder = feature_cache_folder(paths, bb, decoder.policy)
    arrays = _open_features(folder, bb)
    if arrays is None:
        with locked(folder):  # one writer: a second run of the same images waits, then reads its result
            arrays = _open_features(folder, bb)
            if arrays is None:
                try:
                    _compute_features(paths, bb, store_folder, folder, batch_size, chunk_size, decoder, progress,
                                      engine)
                finally:
                    decoder.close()
                arrays = _open_features(folder, bb)
    if arrays is None:
        raise DeviseError(f"{folder}: the feature cache just written is unreadable (see the warning above)")
    return FeatureSet(features=arrays["features"], logits=arrays.get("logits"), paths=paths,
                      valid=np.asarray(arrays["valid"]), backbone=bb.name, folder=folder)


def feature_cache_folder(paths: list[str], bb, decoder_policy: str = "") -> Path:
    """Where the feature cache of these images with backbone `bb` lives (keyed by its image store's key)."""
    store = image_store_folder(paths, bb.image_size, decoder_policy)
    key = hashlib.sha256(f"{FEATURES_VERSION}|{bb.cache_key}|{store.name}".encode()).hexdigest()[:20]
    return data_home() / "features" / bb.name / key


def _open_features(folder: Path, bb) -> dict | None:
    """A finished feature cache's arrays, or None (absent, or damaged: then said and removed). Features and
    logits of valid rows must be finite: a NaN row would poison every index and score built on it."""
    arrays = _open_finished(folder, ("features", "valid"), ("logits",))
    if arrays is None:
        return None
    valid = np.asarray(arrays["valid"], bool)
    want = {"features": (len(valid), bb.feature_dim), "logits": (len(valid), 1000)}
    for name in ("features", "logits"):
        if name not in arrays:
            continue
        arr = arrays[name]
        if arr.shape != want[name] or arr.dtype != np.float32:
            _discard_damaged(folder, f"{name}.npy is {arr.dtype} {arr.shape}, not float32 {want[name]}")
            return None
        for lo in range(0, len(arr), 8192):  # in slices: the cache may be larger than memory
            rows = np.asarray(arr[lo:lo + 8192])[valid[lo:lo + 8192]]
            if not np.isfinite(rows).all():
                _discard_damaged(folder, f"{name}.npy has non-finite values")
                return None
    if (bb.classifier is not None) != ("logits" in arrays):
        _discard_damaged(folder, "logits.npy missing" if bb.classifier is not None else "unexpected logits.npy")
        return None
    return arrays


def _compute_features(paths, bb, store_folder, folder, batch_size, chunk_size, decoder, progress,
                      engine=None) -> None:
    n = len(paths)
    n_chunks = -(-n // chunk_size)
    shapes = {"features": (n, bb.feature_dim), "valid": (n,)}
    if bb.classifier is not None:
        shapes["logits"] = (n, 1000)
    dtypes = {k: "bool" if k == "valid" else "float32" for k in shapes}
    cache = ChunkedArrays(folder, shapes, dtypes, n_chunks)
    if cache.done:
        tqdm.write(f"resuming features: {len(cache.done)} of {n_chunks} chunks already done")
    meta = {"backbone": bb.name, "cache_key": bb.cache_key, "images": store_folder.name, "count": n}
    if engine is not None:
        engine(paths, bb, cache.arrays, {c: (c * chunk_size, min(chunk_size, n - c * chunk_size))
                                         for c in range(n_chunks) if c not in cache.done}, cache.mark_done)
        cache.finish(meta)
        return
    done_images = sum(min(chunk_size, n - c * chunk_size) for c in cache.done)
    batch_size = forward_batch_size(batch_size)
    forward = backbone_forward(bb)
    process, processes = process_index_and_count()
    skip = cache.done
    if processes > 1:  # several hosts: each decodes only its slice of every batch (no image store)
        skip = _done_on_every_host(cache.done, n_chunks)  # every host must run the same chunks
        chunks = _host_chunks(paths, bb.image_size, chunk_size, batch_size, process, processes, skip)
    else:  # decoded now, or read from the store an earlier call made
        chunks = _store_chunks(paths, bb.image_size, chunk_size, decoder, False)

    def batches():
        for c, (lo, hi, images, chunk_valid) in enumerate(chunks):
            if c in skip:
                continue
            if processes > 1:  # this host's slice of each batch; the outputs hold the whole batch
                yield (c, lo, hi, chunk_valid), ((start, min(batch_size, hi - start), images[i])
                                                 for i, start in enumerate(range(lo, hi, batch_size)))
            else:
                yield (c, lo, hi, chunk_valid), padded_batches(lo, images[lo:hi], batch_size)

    def write(start, feats, logits):  # in the pipeline's writer thread, in order
        cache.arrays["features"][start:start + len(feats)] = feats
        if logits is not None:
            cache.arrays["logits"][start:start + len(feats)] = logits
        bar.update(len(feats))

    def chunk_done(chunk):
        c, lo, hi, chunk_valid = chunk
        cache.arrays["valid"][lo:hi] = chunk_valid
        cache.mark_done(c)

    with tqdm(total=n, initial=done_images, desc=f"features ({bb.name})", unit="img",
              disable=not progress) as bar:
        forward_chunks(batches(), forward, write, chunk_done,
                       forward_kwargs={"process_local": True} if processes > 1 else None)
    cache.finish(meta)


def _host_share(paths, size, lo, hi, batch_size, process, processes):
    """This host's slice of every batch of rows lo:hi, decoded: uint8 (batches, per_host, S, S, 3) and
    its valid mask (batches, per_host). Rows past hi (the last batch's padding) are 0 and invalid."""
    per_host = batch_size // processes
    rows = np.concatenate([np.arange(start + process * per_host, start + (process + 1) * per_host)
                           for start in range(lo, hi, batch_size)])
    images = np.zeros((len(rows), size, size, 3), np.uint8)
    valid = np.zeros(len(rows), bool)
    real = rows < hi
    if real.any():
        images[real], valid[real] = load_images([paths[r] for r in rows[real]], size)
    return images.reshape(-1, per_host, size, size, 3), valid.reshape(-1, per_host)


def _done_on_every_host(done: set[int], n_chunks: int) -> set[int]:
    mine = np.zeros(n_chunks, bool)
    mine[sorted(done)] = True
    return set(np.flatnonzero(gather_from_hosts(mine).all(axis=0)).tolist())


def _host_chunks(paths, size, chunk_size, batch_size, process, processes, done):
    """(lo, hi, this host's batch slices, valid[lo:hi]) per chunk, the next chunk decoding while this one
    runs; chunks in `done` (done on every host) yield None."""
    n = len(paths)
    starts = list(range(0, n, chunk_size))
    with ThreadPoolExecutor(1) as ahead:
        def share(lo):
            return ahead.submit(_host_share, paths, size, lo, min(n, lo + chunk_size), batch_size, process, processes)

        todo = [lo for c, lo in enumerate(starts) if c not in done]
        futures = {todo[0]: share(todo[0])} if todo else {}
        for lo in starts:
            if lo not in futures:
                yield lo, min(n, lo + chunk_size), None, None
                continue
            following = [t for t in todo if t > lo][:1]
            if following:
                futures[following[0]] = share(following[0])
            images, valid = futures.pop(lo).result()
            # Gathered here, in the calling thread, never in the decoding one: every host must issue its
            # collectives (this gather, the forward passes) in the same order.
            everyone = gather_from_hosts(valid).transpose(1, 0, 2).reshape(-1)  # batch, host, row: row order
            yield lo, min(n, lo + chunk_size), images, everyone[:min(n, lo + chunk_size) - lo]

