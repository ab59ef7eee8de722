"""Index at scale: recall@10 against exact search, query time and peak memory of building at 10K / 100K / 1M
vectors of dim 384 under a memory cap (issue 21).

The vectors are synthetic, drawn to match real embeddings: the default model (ConSE, MiniLM label space)
embeds the emoji benchmark's 5,112 images (features from the feature cache); their mean and covariance
(eigen-spectrum) define a Gaussian; rows are sampled from it in chunks and normalized to unit length. Each
size is built in its own subprocess by devise.serving.index_build (the builder `devise index` uses), streaming the
rows, so its peak memory (ru_maxrss of that process: Python, numpy, FAISS, paths and index together) is
the build's alone. Recall@10 is the builder's own measure stored in meta.json (1,000 indexed rows as
queries, half of them tuning nprobe/re-rank depth, the other half measured); query time is the median of
200 single queries drawn afresh from the Gaussian (not in the index), one at a time.

    python benchmarks/index_scale.py [--sizes 10000:2GB,100000:2GB,100000:256MB,1000000:2GB]

Prints `RESULT index_<size>[_cap<cap>]_recall10|_query_ms|_peak_mb|_build_s` lines; writes
benchmarks/results/index_scale/results.json and index_scale.png.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "index_scale"
CHUNK = 16_384


def fit_spectrum(out: Path) -> Path:
    """Mean and covariance eigen-decomposition of the default model's embeddings of the emoji benchmark."""
    from devise.data.datasets import load_dataset
    from devise.models.model import load

    dataset = load_dataset("emoji")
    vectors, valid = load("conse").encode_paths(dataset.paths, progress=True, cache=True)
    real = vectors[valid].astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(real.T))
    np.savez(out, mean=real.mean(0), scale=np.sqrt(np.clip(eigenvalues, 0, None)), basis=eigenvectors,
             count=len(real))
    return out


def synthetic(spectrum, n: int, seed: int):
    """n unit rows drawn from the fitted Gaussian, in chunks."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = ((rng.standard_normal((m, len(spectrum["scale"]))) * spectrum["scale"]) @ spectrum["basis"].T
             + spectrum["mean"]).astype(np.float32)
        yield start, x / np.linalg.norm(x, axis=1, keepdims=True)


def child(n: int, cap: str, spectrum_file: str) -> None:
    import faiss

    from devise.serving.index_build import Rows, apply_search_params, build_index_files, parse_memory

    spectrum = dict(np.load(spectrum_file))
    dim = len(spectrum["scale"])

    def chunks():
        for start, x in synthetic(spectrum, n, seed=0):
            yield [f"synthetic/{i:07d}.png" for i in range(start, start + len(x))], x, [None] * len(x)

    with tempfile.TemporaryDirectory() as folder:  # 1.5 GB at 1M rows: never under results/
        t0 = time.perf_counter()
        built = build_index_files(Path(folder), 1, Rows(n, dim, chunks), memory_cap=parse_memory(cap), progress=False)
        build_s = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        index_mb = (Path(folder) / "index-1.faiss").stat().st_size / 2**20
        index = faiss.read_index(str(Path(folder) / "index-1.faiss"))
        apply_search_params(index, built.kind, built.params)
        queries = next(synthetic(spectrum, 200, seed=123))[1]
        times = []
        for q in queries:
            t = time.perf_counter()
            index.search(q[None], 10)
            times.append(time.perf_counter() - t)
    print("CHILD " + json.dumps({"size": n, "cap": cap, "kind": built.kind, "params": built.params,
                                 "recall10": built.recall["recall@10"], "query_ms": 1000 * float(np.median(times)),
                                 "peak_mb": peak_mb, "index_file_mb": index_mb, "build_s": build_s,
                                 "faiss_threads": faiss.omp_get_max_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000:2GB,100000:2GB,100000:256MB,1000000:2GB",
                        help="SIZE:CAP pairs, comma-separated")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "CAP", "SPECTRUM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(int(args.child[0]), args.child[1], args.child[2])
    spectrum_file = Path(tempfile.gettempdir()) / "devise_index_scale_spectrum.npz"
    if not spectrum_file.exists():
        fit_spectrum(spectrum_file)
    saved = RESULTS / "results.json"
    rows = json.loads(saved.read_text()) if saved.exists() else []  # other sizes' rows kept; a rerun replaces
    for item in args.sizes.split(","):
        size, cap = item.split(":")
        run = subprocess.run([sys.executable, __file__, "--child", size, cap, str(spectrum_file)],
                             capture_output=True, text=True)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("CHILD ")), None)
        if line is None:
            print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"size {size} failed")
        row = json.loads(line[6:])
        rows = [r for r in rows if (r["size"], r["cap"]) != (row["size"], row["cap"])] + [row]
        name = f"index_{size}" + ("" if cap == "2GB" else f"_cap{cap}")
        print(f"# {name}: {row['kind']} {row['params']}", flush=True)
        for key in ("recall10", "query_ms", "peak_mb", "build_s"):
            print(f"RESULT {name}_{key} {row[key]:.4g}", flush=True)
        saved.write_text(json.dumps(rows, indent=1))
    plot(rows)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = [f"{r['size']:,}\n{r['kind']} ({r['cap']})" for r in rows]
    for ax, key, title in zip(axes, ("recall10", "query_ms", "peak_mb"),
                              ("recall@10 vs exact", "query ms (median, 1 query)", "peak build memory MB")):
        ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    axes[0].axhline(0.95, color="k", ls="--", lw=0.8)
    axes[2].axhline(2048, color="r", ls="--", lw=0.8)
    fig.suptitle("devise index at scale: 384-d rows from a Gaussian fitted to real ConSE/MiniLM embeddings")
    fig.tight_layout()
    fig.savefig(RESULTS / "index_scale.png", dpi=120)


if __name__ == "__main__":
    main()
