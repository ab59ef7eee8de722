"""The one decode -> forward -> write pipeline: image files in, backbone outputs out, every stage overlapped.

    decode (a pool, the next chunk while this one runs) | transfer + forward (IN_FLIGHT batches dispatched,
    none waited for) | read back + write (one writer thread, in order)

`devise features` (features.extract_features, which also fills the uint8 image store), `devise predict`
of a folder and `devise index` (model.encode_paths) all run through `decode_chunks` and `forward_chunks`;
only what they do with the outputs differs (`write`, `chunk_done`).

Decoding (`choose_decoder`, said once per process in one line): JPEG files on the GPU when JAX runs on a
CUDA device and nvImageCodec is installed (devise.data.gpu_decode, the `.[gpu]` extra); everything else, and
every file on a machine without CUDA, by the one CPU policy (devise.data.images) in threads or spawned
processes, whichever is faster on that machine (`cpu_decode_mode`). This module imports neither Keras nor
JAX at the top: spawned decoding processes import it.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from devise.errors import DeviseError
from devise.data.images import _load_or_none

DECODE_MODES = ("auto", "threads", "processes", "gpu")
IN_FLIGHT = 3  # forward batches dispatched ahead of the one being read back (transfer + compute overlap)
_TASK_ROWS = 16  # images per CPU decoding task
# Processes beat threads from this many cores (16-core H200 machine: threads 1,340 img/s, processes 2,916:
# Pillow holds the GIL between decoder calls); on 2 cores the two match (benchmarks/features.py).
PROCESSES_FROM_CORES = 4

_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}
_SAID: set[str] = set()


def _main_is_guarded() -> bool:
    """A spawned worker re-imports the caller's main script: safe only when it has the `__main__` guard
    (the devise CLI and the benchmarks do), or when there is no script (python -c, a notebook)."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None)
    if file is None or getattr(main, "__spec__", None) is not None:  # no script, or `python -m module`
        return True
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return False
    return "__name__" in source and "__main__" in source


def cpu_decode_mode(cores: int | None = None) -> str:
    """The faster CPU decode mode here: processes from PROCESSES_FROM_CORES cores (when the main script
    allows spawning them), else threads."""
    cores = cores or os.cpu_count() or 1
    return "processes" if cores >= PROCESSES_FROM_CORES and _main_is_guarded() else "threads"


@dataclass
class Decoder:
    """How a run decodes: the CPU mode and pool, and the GPU decoder for JPEG files (None: CPU only)."""

    mode: str  # "threads" or "processes": the CPU path (every file without a GPU decoder, non-JPEGs with one)
    workers: int
    gpu: object | None = None  # devise.data.gpu_decode.GpuJpegDecoder
    reason: str = ""
    _pool: object = field(default=None, repr=False)
    _owned: bool = field(default=False, repr=False)

    @property
    def policy(self) -> str:
        """Marks the image store's key where pixels differ from the CPU path's (devise.data.features.images_key)."""
        return "" if self.gpu is None else "+gpu-jpeg-box-draft"

    def describe(self) -> str:
        cpu = f"CPU ({self.workers} {self.mode})"
        return (f"decoding: JPEG on the GPU (nvImageCodec), other files on the {cpu}" if self.gpu is not None
                else f"decoding: {cpu}{f'; {self.reason}' if self.reason else ''}")

    def pool(self):
        if self._pool is None:
            self._pool, self._owned = _decode_pool(self.mode, self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._owned:
            self._pool.shutdown()
        self._pool = None


def choose_decoder(decode: str = "auto", workers: int | None = None, say: bool = True) -> Decoder:
    """decode: "auto" (GPU for JPEGs where possible, else the faster CPU mode), "gpu" (the same, and
    the reason said when the GPU cannot be used), "threads" or "processes" (CPU only). The choice is
    printed once per process (stderr, one line) when `say`."""
    if decode not in DECODE_MODES:
        raise DeviseError(f"decode must be one of {', '.join(DECODE_MODES)}, not {decode!r}")
    workers = workers or os.cpu_count() or 1
    gpu, reason = None, ""
    if decode in ("auto", "gpu"):
        from devise.data.gpu_decode import gpu_jpeg_decoder

        gpu, reason = gpu_jpeg_decoder()
    mode = decode if decode in ("threads", "processes") else cpu_decode_mode(workers)
    decoder = Decoder(mode, workers, gpu, reason)
    line = decoder.describe()
    if say and line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)
    return decoder


def _decode_pool(mode: str, workers: int):
    """(pool, whether the caller shuts it down)."""
    # Processes are spawned, never forked beside JAX's threads; a spawned worker re-imports the caller's
    # main module (seconds if that imports JAX), so the pool is kept for later calls.
    if mode == "threads":
        return ThreadPoolExecutor(workers), True
    if workers not in _PROCESS_POOLS:
        _PROCESS_POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return _PROCESS_POOLS[workers], False


def _decode_rows(target, lo: int, paths: list[str], size: int):
    """Decode `paths` into rows lo.. of `target`: a store file's name (opened here, in a worker process;
    the same file is shared through the page cache), an array (a thread writes in place), or None (a
    process returns the rows). Returns (for each row None or the one-line reason it is unreadable, rows or None)."""
    out = np.load(target, mmap_mode="r+") if isinstance(target, str) else target
    rows = np.zeros((len(paths), size, size, 3), np.uint8) if out is None else None
    errors = []
    for i, path in enumerate(paths):
        result = _load_or_none((path, size))
        image = 0 if isinstance(result, str) else result
        if out is None:
            rows[i] = image
        else:
            out[lo + i] = image
        errors.append(result if isinstance(result, str) else None)
    return errors, rows


def _submit_chunk(decoder: Decoder, images: np.ndarray, store_file: str | None, lo: int, hi: int,
                  paths: list[str], size: int) -> list[tuple[list[int], Future]]:
    """The decoding tasks of rows lo:hi: ([rows], future of (errors, rows or None)) each."""
    rows = list(range(lo, hi))
    tasks = []
    if decoder.gpu is not None:
        jpegs = [r for r in rows if decoder.gpu.takes(paths[r])]
        if jpegs:
            tasks.append((jpegs, decoder.gpu.submit([paths[r] for r in jpegs], size, images, jpegs)))
        on_gpu = set(jpegs)
        rows = [r for r in rows if r not in on_gpu]
    # Threads write into the array; processes into the store file, or return their rows (no store).
    target = images if decoder.mode == "threads" else store_file
    for i in range(0, len(rows), _TASK_ROWS):
        part = rows[i:i + _TASK_ROWS]
        if part == list(range(part[0], part[0] + len(part))):
            tasks.append((part, decoder.pool().submit(_decode_rows, target, part[0], [paths[r] for r in part], size)))
        else:  # rows not contiguous (JPEGs taken by the GPU): one task per row
            tasks += [([r], decoder.pool().submit(_decode_rows, target, r, [paths[r]], size)) for r in part]
    return tasks


def decode_chunks(paths: list[str], size: int, chunk_size: int, decoder: Decoder, *, images: np.ndarray | None = None,
                  store_file: str | None = None, skip=frozenset(), bar=None):
    """Yield (c, lo, hi, images[lo:hi], valid, errors) per chunk not in `skip`, decoding the next chunk
    while the caller uses this one. images: the (memory-mapped) store to fill, store_file its name (for
    worker processes); None: each chunk's own array. errors: the one-line reasons of unreadable rows."""
    n = len(paths)
    starts = [c for c in range(-(-n // chunk_size)) if c not in skip]
    pending: dict[int, tuple] = {}

    def submit(c):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        if images is not None:  # rows lo:hi of the store
            return images, 0, _submit_chunk(decoder, images, store_file, lo, hi, paths, size)
        out = np.zeros((hi - lo, size, size, 3), np.uint8)  # this chunk's own rows 0:hi-lo
        return out, lo, _submit_chunk(decoder, out, None, 0, hi - lo, paths[lo:hi], size)

    try:
        for i, c in enumerate(starts):
            for t in islice(starts, i, i + 2):  # this chunk, and the next, decoding while this one is used
                if t not in pending:
                    pending[t] = submit(t)
            out, base, tasks = pending.pop(c)
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            valid = np.ones(hi - lo, bool)
            errors = []
            for rows, future in tasks:
                try:
                    row_errors, decoded = future.result()
                except BrokenProcessPool:
                    _PROCESS_POOLS.clear()  # the next call starts new workers
                    raise DeviseError("a decoding process died (out of memory?): run again to resume") from None
                for j, (r, error) in enumerate(zip(rows, row_errors)):
                    if decoded is not None:
                        out[r] = decoded[j]
                    if error is not None:
                        valid[r + base - lo] = False
                        errors.append(error)
                if bar is not None:
                    bar.update(len(rows))
            yield c, lo, hi, out[lo - base:hi - base], valid, errors
    finally:
        for _, _, tasks in pending.values():  # left by an error or an abandoned generator
            for _, future in tasks:
                future.cancel()


def forward_chunks(chunks, forward, write, chunk_done=None, *, in_flight: int = IN_FLIGHT,
                   forward_kwargs: dict | None = None) -> None:
    """Run `forward` over every batch of every chunk, `in_flight` batches dispatched ahead, and hand the
    outputs to write(start, features, logits) and then chunk_done(chunk) in one writer thread, in order:
    the device never waits on a read back or a disk write. chunks: (chunk, batches) where batches yields
    (start, count, fixed-size batch); the forward returns (features, logits or None) device arrays."""
    forward_kwargs = forward_kwargs or {}
    with ThreadPoolExecutor(1, thread_name_prefix="devise-writer") as writer:
        pending: deque[Future] = deque()

        def wait(limit):
            while len(pending) > limit:
                pending.popleft().result()  # re-raises a write's error here

        for chunk, batches in chunks:
            for start, count, batch in batches:
                outputs = forward(batch, **forward_kwargs)
                pending.append(writer.submit(_read_back_and_write, write, start, count, outputs))
                wait(in_flight)
            if chunk_done is not None:
                pending.append(writer.submit(chunk_done, chunk))
        wait(0)


def _read_back_and_write(write, start, count, outputs):
    feats, logits = outputs
    write(start, np.asarray(feats)[:count], None if logits is None else np.asarray(logits)[:count])


def bucket(n: int, batch_size: int) -> int:
    """Padded batch size: the next power of two up to batch_size (a handful of compiled shapes, and a
    single uploaded image does not pay for a full batch)."""
    size = 1
    while size < n and size < batch_size:
        size *= 2
    return min(size, batch_size)


def padded_batches(lo: int, rows: np.ndarray, batch_size: int, small_last: bool = False):
    """(start, count, batch padded to batch_size) over rows (rows lo.. of the whole list); small_last:
    a short batch is padded only to the next power of two (few images: few compiled shapes, little waste)."""
    from devise.runtime import pad_batch

    for s in range(0, len(rows), batch_size):
        count = min(batch_size, len(rows) - s)
        yield lo + s, count, pad_batch(rows[s:s + batch_size], bucket(count, batch_size) if small_last else batch_size)
