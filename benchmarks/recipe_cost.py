"""What the 5-head devise_softmax_mlp recipe costs against one devise_hinge_mlp head (issue 19's CPU goal:
<= 2x), on the emoji benchmark's seed 0, in one process: both methods are fit (two stages each) and scored
by `devise benchmark`'s own code, which records each method's wall seconds per seed (metrics.json "cost").
The features must be cached (run `devise features` or the benchmark first); they are not timed.

Last line: RESULT {"hinge_mlp_s": .., "softmax_mlp_5_heads_s": .., "ratio": .. (wall), "cpu_ratio": .. (CPU
seconds over all threads: less distorted on a busy machine), "zsl_hit@5": {...}}
"""
from __future__ import annotations

import argparse
import json
import tempfile

import devise  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated benchmark seeds (default 0)")
    args = parser.parse_args()
    from devise.evaluation.benchmark import run_benchmark

    methods = ["devise_hinge_mlp", "devise_softmax_mlp"]
    report = run_benchmark(seeds=[int(s) for s in args.seeds.split(",")], methods=methods,
                           out_dir=tempfile.mkdtemp(prefix="devise-recipe-cost-"))
    wall = {m: report["methods"][m]["cost"]["seconds"] for m in methods}
    cpu = {m: report["methods"][m]["cost"]["cpu_seconds"] for m in methods}
    print("RESULT " + json.dumps({
        "hinge_mlp_s": round(wall[methods[0]], 1), "softmax_mlp_5_heads_s": round(wall[methods[1]], 1),
        "ratio": round(wall[methods[1]] / wall[methods[0]], 2),
        "cpu_ratio": round(cpu[methods[1]] / cpu[methods[0]], 2),
        "zsl_hit@5": {m: round(report["methods"][m]["zsl"]["hit@5"], 4) for m in methods}}))


if __name__ == "__main__":
    main()
