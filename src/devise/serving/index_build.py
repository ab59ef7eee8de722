"""Building an image index's files from rows, streaming, within a memory cap (used by search.build_index).

Rows (paths with unit vectors) come from anywhere: a kept part of an older index, vectors embedded in this
process, or a shard folder another engine wrote (devise.data.shards). They are read once, one chunk at a time,
into the index's embeddings file (`embeddings-<gen>.npy`, written sequentially, never held whole); every
later pass (training sample, adding to FAISS, exact search for the recall check) reads that file in blocks
with plain reads, not a memory map, so the pages read do not stay in the process's memory.

The kind (registry KINDS) is chosen by size, dimension and the memory cap:
- flat (IndexFlatIP, exact) below APPROX_THRESHOLD rows while its vectors fit INDEX_SHARE of the cap;
- hnsw (IndexHNSWFlat) at or above APPROX_THRESHOLD while vectors and graph fit (today's rule when no cap);
- ivfpq above that: IVF with product quantization, trained on a sample, re-ranked by 8-bit scalar-quantized
  copies of the vectors (`Refine(SQ8)`, 1 byte a dimension) when those fit, so recall stays near exact.
  nlist ~ sqrt(N) (a power of two, at least 39 training rows a list); PQ with D/4 sub-quantizers of 8 bits
  (fewer bits when N is small); nprobe (and the re-rank depth) tuned on half of the recall queries to reach
  RECALL_TARGET, recall then measured on the other half.
Recall@10 against exact search (streamed over the embeddings file) on RECALL_QUERIES indexed rows used as
queries is stored in meta.json with the kind's parameters.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from devise.errors import DeviseError
from devise.storage import atomic_write, check_free_space

# Measured on the shared 2-core CPU, one FAISS thread, 50-d unit vectors in 2000 clusters, one query at a
# time (k=10): IndexFlatIP 0.27 / 0.66 / 5.2 ms per query at 10K / 50K / 200K images; HNSW (M=32,
# efConstruction=80, efSearch=128) 0.30 / 0.70 / 1.4 ms with recall@10 = 1.000 at all three, but 1.7 /
# 16 / 96 s to build. Below ~50K exact search is as fast and builds instantly; by 200K it is 4x slower.
# The switch sits between, at 100K images (HNSW build there: under a minute).
APPROX_THRESHOLD = 100_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
INDEX_SHARE = 0.5  # of the memory cap for the index itself; the rest: paths, a training sample, read blocks
BLOCK_ROWS = 16_384  # rows read at a time from the embeddings file (24 MB at 384-d)
RECALL_QUERIES, RECALL_K, RECALL_TARGET = 1000, 10, 0.95
TRAIN_ROWS_PER_LIST, MIN_TRAIN_ROWS = 40, 10_000  # k-means' 39 a centroid; PQ's 256 centroids x 39
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
K_FACTORS = (4, 8, 16, 32, 64)  # candidates re-ranked per result by the SQ8 copies


def parse_memory(text: str | int | None) -> int | None:
    """'2GB', '512MB', '1.5G', '800M' or a number of bytes -> bytes (binary units); None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise DeviseError(f"memory cap '{text}': give a size like 2GB, 512MB or a number of bytes")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def file_stamp(path: str) -> list[int] | None:
    """Size, mtime, device and inode (the layout serve.IndexedFiles reads): a file replaced by another one
    (a rename over it, `cp -p`, rsync -t) with the same size and mtime still counts as changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino]


# ---------------------------------------------------------------- rows

@dataclass
class Rows:
    """`count` valid rows of `dim`: chunks() yields (paths, float32 vectors, stamps or None), in order."""

    count: int
    dim: int
    chunks: Callable[[], Iterator[tuple]]


def rows_from_arrays(paths, vectors, stamps=None) -> Rows:
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors.reshape(len(paths), vectors.shape[-1] if vectors.ndim == 2 else -1)  # (0, D) stays (0, D)
    return Rows(len(paths), vectors.shape[1], lambda: iter([(list(paths), vectors, stamps)]))


def rows_from_index_file(file: str | os.PathLike, keep_rows, paths, stamps) -> Rows:
    """Rows `keep_rows` (ascending) of an older index's embeddings file, with their paths and stamps."""
    keep_rows = np.asarray(keep_rows, np.int64)
    dim = npy_shape(file)[1]

    def chunks():
        done = 0
        for start, block in npy_blocks(file):
            picked = keep_rows[(keep_rows >= start) & (keep_rows < start + len(block))]
            if len(picked):
                n = len(picked)
                yield paths[done:done + n], block[picked - start], stamps[done:done + n]
                done += n

    return Rows(len(keep_rows), dim, chunks)


def rows_from_shards(folder: str | os.PathLike) -> Rows:
    """The valid rows of a complete shard folder (devise.data.shards), one shard in memory at a time."""
    from devise.data.shards import check_complete, read_member, read_shard

    plan = check_complete(folder)
    count = sum(int(read_member(folder, k, "valid", plan).sum()) for k in range(len(plan["shards"])))

    def chunks():
        for k in range(len(plan["shards"])):
            paths, vectors, valid = read_shard(folder, k, plan)
            yield [p for p, ok in zip(paths, valid) if ok], vectors[valid], None

    return Rows(count, plan["dim"], chunks)


def concat_rows(*parts: Rows) -> Rows:
    parts = [p for p in parts if p is not None and p.count]
    dims = {p.dim for p in parts}
    if len(dims) > 1:
        raise DeviseError(f"rows of different dimensions {sorted(dims)} cannot share an index")
    dim = dims.pop() if dims else 0

    def chunks():
        for part in parts:
            yield from part.chunks()

    return Rows(sum(p.count for p in parts), dim, chunks)


# ---------------------------------------------------------------- the embeddings file, read in blocks

def npy_shape(file) -> tuple:
    with open(file, "rb") as fh:
        return _npy_header(fh)[0]


def _npy_header(fh):
    major = np.lib.format.read_magic(fh)[0]
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(fh)


def npy_blocks(file, block_rows: int = BLOCK_ROWS):
    """(first row, float32 block) over a 2-d .npy file, read with plain reads (no memory map)."""
    with open(file, "rb") as fh:
        (n, dim), _, dtype = _npy_header(fh)
        for start in range(0, n, block_rows):
            m = min(block_rows, n - start)
            yield start, np.fromfile(fh, dtype=dtype, count=m * dim).reshape(m, dim).astype(np.float32, copy=False)


def read_rows(file, rows) -> np.ndarray:
    """The given rows (ascending) of a .npy file, gathered block by block."""
    rows = np.asarray(rows, np.int64)
    parts = [block[rows[(rows >= start) & (rows < start + len(block))] - start] for start, block in npy_blocks(file)]
    return np.concatenate(parts) if parts else np.zeros((0, npy_shape(file)[1]), np.float32)


def write_rows(file: Path, rows: Rows) -> tuple[list, list]:
    """Stream `rows` into the .npy `file` (atomically); returns their paths and stamps. A row that is not
    finite is refused, naming its image (a NaN would poison every search)."""
    check_free_space(file, rows.count * rows.dim * 4, "the index's embeddings")
    paths, stamps = [], []

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                     "shape": (rows.count, rows.dim)})
            for chunk_paths, vectors, chunk_stamps in rows.chunks():
                vectors = np.ascontiguousarray(vectors, np.float32)
                finite = np.isfinite(vectors).all(axis=1)
                if not finite.all():
                    raise DeviseError(f"{chunk_paths[int(np.argmin(finite))]}: its embedding is not finite "
                                      "(NaN or infinity); not indexed")
                fh.write(vectors.tobytes())
                paths.extend(chunk_paths)
                stamps.extend(chunk_stamps if chunk_stamps is not None else [file_stamp(p) for p in chunk_paths])
        if len(paths) != rows.count:
            raise DeviseError(f"{file}: {len(paths)} rows read, {rows.count} expected (did the rows change?)")

    atomic_write(file, write)
    return paths, stamps


# ---------------------------------------------------------------- kinds

@dataclass
class Kind:
    """An index kind: its memory in bytes, its FAISS builder and how its search-time parameters are set."""

    nbytes: Callable[[int, int, dict], int]
    make: Callable[[int, dict], object]
    search_params: Callable[[object, dict], None] = lambda index, params: None
    trained: bool = False
    tunable: bool = False


def _make_flat(dim, params):
    import faiss

    return faiss.IndexFlatIP(dim)


def _make_hnsw(dim, params):
    import faiss

    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def _hnsw_search(index, params):
    import faiss

    faiss.downcast_index(index).hnsw.efSearch = HNSW_EF_SEARCH


def _ivfpq_factory(dim, params) -> str:
    return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}" + (",Refine(SQ8)" if params["refine"] else "")


def _make_ivfpq(dim, params):
    import faiss

    return faiss.index_factory(dim, _ivfpq_factory(dim, params), faiss.METRIC_INNER_PRODUCT)


def _ivfpq_search(index, params):
    import faiss

    faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 16))
    if params["refine"]:
        faiss.downcast_index(index).k_factor = float(params.get("k_factor", 8))


KINDS = {
    "flat": Kind(lambda n, d, p: n * d * 4, _make_flat),
    "hnsw": Kind(lambda n, d, p: int(n * (d * 4 + HNSW_M * 2 * 4 * 1.2)), _make_hnsw, _hnsw_search),
    "ivfpq": Kind(lambda n, d, p: n * (p["m"] * p["nbits"] // 8 + 8 + (d if p["refine"] else 0)) + p["nlist"] * d * 4,
                  _make_ivfpq, _ivfpq_search, trained=True, tunable=True),
}


def ivfpq_params(count: int, dim: int, refine: bool = True) -> dict:
    """nlist a power of two near sqrt(N) with >= 39 training rows a list; D/4 sub-quantizers (a divisor
    of D); 8-bit codes, fewer when N is too small to train 256 centroids each."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(count))))
    while nlist > 1 and count < 39 * nlist:
        nlist //= 2
    m = max(k for k in range(1, max(1, dim // 4) + 1) if dim % k == 0)
    nbits = max(1, min(8, int(math.log2(max(2, count // 39)))))
    return {"nlist": nlist, "m": m, "nbits": nbits, "refine": refine}


def choose_kind(count: int, dim: int, memory_cap: int | None = None,
                approx_threshold: int = APPROX_THRESHOLD) -> tuple[str, dict]:
    """(kind, params) for `count` rows of `dim` under `memory_cap` bytes (None: no cap, today's rule)."""
    preferred = "flat" if count < approx_threshold else "hnsw"
    if memory_cap is None:
        return preferred, {}
    budget = memory_cap * INDEX_SHARE
    if KINDS[preferred].nbytes(count, dim, {}) <= budget:
        return preferred, {}
    for refine in (True, False):
        params = ivfpq_params(count, dim, refine)
        if KINDS["ivfpq"].nbytes(count, dim, params) <= budget:
            return "ivfpq", params
    raise DeviseError(f"memory cap {memory_cap / 2**20:,.0f} MiB is too small for an index of {count:,} rows of "
                      f"{dim} (even the most compressed kind needs about "
                      f"{KINDS['ivfpq'].nbytes(count, dim, params) / INDEX_SHARE / 2**20:,.0f} MiB)")


def apply_search_params(index, kind: str, params: dict) -> None:
    KINDS[kind].search_params(index, params)


# ---------------------------------------------------------------- building

@dataclass
class BuiltIndex:
    index: object
    kind: str
    params: dict
    recall: dict
    paths: list = field(default_factory=list)
    stamps: list = field(default_factory=list)


def _sample_rows(count: int, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False))


def write_faiss(index, path: str) -> None:
    """faiss.write_index through a Python file: a full disk is an OSError (storage says it in one line), not
    faiss' RuntimeError."""
    import faiss

    with open(path, "wb") as fh:
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))


def build_index_files(folder: Path, gen: int, rows: Rows, memory_cap: int | None = None,
                      approx_threshold: int = APPROX_THRESHOLD, progress: bool = True) -> BuiltIndex:
    """Write embeddings-<gen>.npy and index-<gen>.faiss in `folder` from `rows`; meta.json is the caller's."""
    from tqdm import tqdm

    emb_file = folder / f"embeddings-{gen}.npy"
    paths, stamps = write_rows(emb_file, rows)
    count, dim = rows.count, rows.dim
    kind, params = choose_kind(count, dim, memory_cap, approx_threshold)
    spec = KINDS[kind]
    index = spec.make(dim, params)
    if spec.trained and count:
        sample_rows = _sample_rows(count, max(TRAIN_ROWS_PER_LIST * params["nlist"], MIN_TRAIN_ROWS), seed=0)
        index.train(read_rows(emb_file, sample_rows))
    blocks = tqdm(npy_blocks(emb_file), total=-(-count // BLOCK_ROWS), desc=f"indexing ({kind})", unit="block",
                  disable=not progress or count < 4 * BLOCK_ROWS)
    for _, block in blocks:
        index.add(block)
    spec.search_params(index, params)
    recall = {"recall@10": 1.0, "exact": True} if kind == "flat" else \
        measure_recall(index, kind, params, emb_file, count)
    atomic_write(folder / f"index-{gen}.faiss", lambda tmp: write_faiss(index, tmp))
    return BuiltIndex(index, kind, params, recall, paths, stamps)


# ---------------------------------------------------------------- recall against exact search

def exact_top_k(file, queries: np.ndarray, k: int) -> np.ndarray:
    """Row ids of the exact top-k inner products of `queries` over a .npy file, streamed block by block."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start, block in npy_blocks(file):
        scores = queries @ block.T
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
        i = np.concatenate([best_i, top + start], 1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def recall_at_k(index, queries, truth, k) -> float:
    _, found = index.search(np.ascontiguousarray(queries, np.float32), k)
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def measure_recall(index, kind: str, params: dict, file, count: int) -> dict:
    """Recall@10 against exact search on indexed rows used as queries. Tunable kinds first pick their search
    parameters on half of the queries (the cheapest reaching RECALL_TARGET), then report the other half."""
    k = min(RECALL_K, count)
    rows = _sample_rows(count, RECALL_QUERIES, seed=1)
    queries = read_rows(file, rows)
    queries = queries[np.random.default_rng(2).permutation(len(queries))]
    truth = exact_top_k(file, queries, k)
    held = slice(None)
    if KINDS[kind].tunable and len(queries) >= 2:
        half = len(queries) // 2
        tune, held = slice(None, half), slice(half, None)
        nlist = params["nlist"]
        grid = [(p, f) for f in (K_FACTORS if params["refine"] else (1,)) for p in NPROBES if p <= nlist]
        grid = sorted(set(grid), key=lambda pf: pf[0] * pf[1])  # about the cost of a query
        for nprobe, k_factor in grid:
            params.update(nprobe=nprobe, k_factor=k_factor)
            apply_search_params(index, kind, params)
            if recall_at_k(index, queries[tune], truth[tune], k) >= RECALL_TARGET:
                break
    recall = recall_at_k(index, queries[held], truth[held], k)
    return {"recall@10": round(recall, 4), "exact": False, "queries": len(queries[held]),
            "queries_from": "indexed rows", **({"tuned_on": len(queries) - len(queries[held])}
                                               if KINDS[kind].tunable else {})}
