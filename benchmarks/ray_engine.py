"""The Ray engine against in-process embedding, on the same cores: the emoji benchmark's images, the default
model of `devise index` (ConSE over EfficientNet-Lite0, defaults.BACKBONE, MiniLM label space).

    .venv/bin/python benchmarks/ray_engine.py [--limit N] [--out benchmarks/results]

1. in-process: the backbone loaded, then DeviseModel.encode_paths(cache=True), what `devise index` runs
   (decode threads overlapping the forward), from an empty feature cache (its folders removed before and after);
2. Ray: a local 2-node ray.cluster_utils.Cluster (one CPU each, 127.0.0.1) started, the images embedded
   into shards (embed_on_ray), the cluster shut down: all of it timed (cluster start included);
3. one node lost: the same on a fresh cluster, the worker node removed once half the rows are back; rows
   lost and duplicated counted in the shards (and rows Ray delivered twice, which the driver dropped).
Prints `RESULT name value` lines and writes ray_engine.json. Throughput ratio = in-process seconds / Ray seconds
(goal >= 0.8). On a shared machine the figures are noisy: the two runs follow each other in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def in_process(paths, model) -> tuple[float, np.ndarray]:
    from devise.data.features import feature_cache_folder, image_store_folder

    start = time.perf_counter()
    bb = model.backbone  # timed: the Ray figure includes each actor loading its model too
    caches = [image_store_folder(paths, bb.image_size), feature_cache_folder(paths, bb)]
    for folder in caches:  # this list's image store and feature cache: the run starts from nothing
        shutil.rmtree(folder, ignore_errors=True)
    vectors, valid = model.encode_paths(paths, progress=True, cache=True)
    seconds = time.perf_counter() - start
    for folder in caches:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds, np.where(valid[:, None], vectors, 0)


def on_ray(paths, model, folder, lose_node: bool) -> dict:
    from devise.data import shards
    from devise.data.ray_engine import embed_on_ray, local_cluster, remove_local_node

    removed = []
    start = time.perf_counter()
    with local_cluster(nodes=2, cpus_per_node=1) as cluster:
        started = time.perf_counter() - start

        def lose(done, total):  # the worker node, once half the rows are back
            if lose_node and not removed and done >= total // 2:
                remove_local_node(cluster, next(iter(cluster.worker_nodes)))
                removed.append(done)

        job = embed_on_ray(paths, model, folder, address=cluster.address, shard_rows=512, on_rows=lose)
    seconds = time.perf_counter() - start
    parts = list(shards.read_shards(folder))
    got = [p for part, _, _ in parts for p in part]
    counts = {}
    for p in got:
        counts[p] = counts.get(p, 0) + 1
    return {"seconds": seconds, "cluster_start_s": started, "vectors": np.concatenate([v for _, v, _ in parts]),
            "paths": got, "lost": sum(1 for p in paths if p not in counts),
            "duplicated": sum(c - 1 for c in counts.values()), "dropped_by_driver": job.duplicates,
            "removed_at_row": removed[0] if removed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N images only (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    from devise.data.datasets import load_dataset
    from devise.models.model import load

    paths = [str(p) for p in load_dataset("emoji").paths][:args.limit]
    model = load("conse")
    load_before = os.getloadavg()[0]  # the machine is shared: the load says how noisy the figures are
    print(f"{len(paths)} images, model conse ({model.backbone_name}), {os.cpu_count()} cores, "
          f"load average {load_before:.1f}", flush=True)
    base_s, base = in_process(paths, model)
    print(f"in-process: {base_s:.1f} s ({len(paths) / base_s:.1f} img/s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        ray_run = on_ray(paths, model, work / "shards", lose_node=False)
        print(f"ray: {ray_run['seconds']:.1f} s (cluster start {ray_run['cluster_start_s']:.1f} s)", flush=True)
        lost_run = on_ray(paths, model, work / "shards-lost", lose_node=True)
        print(f"ray, node lost at row {lost_run['removed_at_row']}: {lost_run['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "images": len(paths), "model": "conse", "backbone": model.backbone_name, "cores": os.cpu_count(),
        "machine": "shared 2-core CPU (other jobs running)",
        "load_average_1min": {"start": round(load_before, 1), "end": round(os.getloadavg()[0], 1)},
        "in_process_s": round(base_s, 1), "ray_s": round(ray_run["seconds"], 1),
        "ray_cluster_start_s": round(ray_run["cluster_start_s"], 1),
        "throughput_ratio": round(base_s / ray_run["seconds"], 3),
        "identical_paths": ray_run["paths"] == paths,
        "max_abs_diff": float(np.abs(ray_run["vectors"] - base).max()),
        "node_lost": {k: lost_run[k] for k in ("lost", "duplicated", "dropped_by_driver", "removed_at_row")}
        | {"seconds": round(lost_run["seconds"], 1), "identical_paths": lost_run["paths"] == paths,
           "max_abs_diff": float(np.abs(lost_run["vectors"] - base).max())},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_engine.json").write_text(json.dumps(result, indent=1))
    for name in ("throughput_ratio", "in_process_s", "ray_s", "ray_cluster_start_s", "identical_paths", "max_abs_diff"):
        print(f"RESULT {name} {result[name]}")
    for name, value in result["node_lost"].items():
        print(f"RESULT node_lost_{name} {value}")


if __name__ == "__main__":
    main()
