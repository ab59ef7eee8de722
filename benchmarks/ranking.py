"""How ranking time grows with the number of labels and of query images, and top-k vs a full sort.

Scores are cosine similarities of random unit vectors (the timing does not depend on their values).
Prints a table, saves benchmarks/results/ranking.png (or --out's), and ends with
RESULT {"labels": 100000, "topk_vs_full_sort": ...}: top-k (keras.ops.top_k on the device) against
numpy's full argsort of the SAME score matrix, medians of repeated runs. Peak memory is bounded by the
query batch: batch x labels x 4 bytes of scores at a time, whatever the number of images.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import devise  # noqa: F401
import numpy as np
from keras import ops

from devise.evaluation.ranking import top_k_labels

DIM, K, BATCH = 50, 10, 1024


def median_time(fn, repeats=3) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the plot and table")
    parser.add_argument("--quick", action="store_true", help="small grid (a dry run); the 100K top-k check stays")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n_labels in (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000):
        labels = rng.standard_normal((n_labels, DIM), dtype=np.float32)
        for n_images in (1_024, 2_048) if args.quick else (1_024, 4_096, 16_384):
            queries = rng.standard_normal((n_images, DIM), dtype=np.float32)
            seconds = median_time(lambda: top_k_labels(queries, labels, K, batch_size=BATCH), repeats=2)
            rows.append({"labels": n_labels, "images": n_images, "seconds": seconds,
                         "images_per_s": n_images / seconds,
                         "score_block_mib": BATCH * n_labels * 4 / 2**20,
                         "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            print(f"labels {n_labels:>7}  images {n_images:>6}  {seconds:7.3f} s  "
                  f"{n_images / seconds:9.0f} images/s  score block {rows[-1]['score_block_mib']:6.1f} MiB  "
                  f"max RSS {rows[-1]['max_rss_mib']:7.0f} MiB", flush=True)

    # top-k vs full sort on the same score matrix (1024 queries x 100K labels).
    labels = rng.standard_normal((100_000, DIM), dtype=np.float32)
    queries = rng.standard_normal((BATCH, DIM), dtype=np.float32)
    scores = ops.matmul(ops.convert_to_tensor(queries), ops.convert_to_tensor(labels.T))
    scores_np = np.asarray(scores)
    t_topk = median_time(lambda: np.asarray(ops.top_k(scores, K)[1]), repeats=5)
    t_sort = median_time(lambda: np.argsort(-scores_np, axis=1)[:, :K], repeats=3)
    same = np.array_equal(np.sort(np.asarray(ops.top_k(scores, K)[1]), 1),
                          np.sort(np.argsort(-scores_np, axis=1)[:, :K], 1))
    print(f"1024 x 100000 scores: top-k {t_topk * 1e3:.1f} ms, full sort {t_sort * 1e3:.1f} ms, same labels: {same}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n_images in sorted({r["images"] for r in rows}):
        pts = [r for r in rows if r["images"] == n_images]
        ax.plot([r["labels"] for r in pts], [r["seconds"] for r in pts], "o-", label=f"{n_images} images")
    ax.set(xscale="log", yscale="log", xlabel="labels", ylabel="seconds (top-10, batched)",
           title="Ranking time vs labels and images")
    ax.legend()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=120)
    (out / "ranking.json").write_text(json.dumps(rows, indent=1))
    print("RESULT " + json.dumps({"labels": 100_000, "topk_vs_full_sort": round(t_sort / t_topk, 2),
                                  "topk_ms": round(t_topk * 1e3, 1), "full_sort_ms": round(t_sort * 1e3, 1)}))


if __name__ == "__main__":
    main()
