"""What the devise_softmax_mlp recipe (an ensemble of heads) costs against one devise_hinge_mlp head
(issue 19's CPU goal: <= 2x), on the emoji benchmark's seed 0, in one process: both methods are fit (two
stages each) and scored by `devise benchmark`'s own code, which records each method's wall seconds per
seed (metrics.json "cost").
The features must be cached (run `devise features` or the benchmark first); they are not timed.

Last line: RESULT {"hinge_mlp_s": .., "softmax_mlp_s": .., "ratio": .. (wall), "cpu_ratio": .. (CPU
seconds over all threads: less distorted on a busy machine), "zsl_hit@5": {...}}
--recipe '{"hidden": 1024, "patience": 15, "ensemble": 5}' times devise_softmax_mlp with those settings instead
of the preset's (e.g. the recipe before issue 19); --repeats N runs it N times and prints the median ratios.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

import devise  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated benchmark seeds (default 0)")
    parser.add_argument("--recipe", default=None, help="JSON settings replacing the preset's for devise_softmax_mlp")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the RESULT line holds the medians")
    args = parser.parse_args()
    from devise.evaluation.benchmark import METHODS, run_benchmark

    methods = ["devise_hinge_mlp", "devise_softmax_mlp"]
    if args.recipe:
        METHODS["devise_softmax_mlp"] = {**METHODS["devise_softmax_mlp"], **json.loads(args.recipe)}
    runs = []
    for _ in range(args.repeats):
        report = run_benchmark(seeds=[int(s) for s in args.seeds.split(",")], methods=methods,
                               out_dir=tempfile.mkdtemp(prefix="devise-recipe-cost-"))
        wall = {m: report["methods"][m]["cost"]["seconds"] for m in methods}
        cpu = {m: report["methods"][m]["cost"]["cpu_seconds"] for m in methods}
        runs.append({"hinge_mlp_s": wall[methods[0]], "softmax_mlp_s": wall[methods[1]],
                     "ratio": wall[methods[1]] / wall[methods[0]], "cpu_ratio": cpu[methods[1]] / cpu[methods[0]]})
        print("run " + json.dumps({k: round(v, 2) for k, v in runs[-1].items()}), flush=True)
    print("RESULT " + json.dumps({
        **{k: round(float(np.median([r[k] for r in runs])), 2) for k in runs[0]},
        "repeats": args.repeats, "recipe": {k: v for k, v in METHODS["devise_softmax_mlp"].items() if k != "method"},
        "zsl_hit@5": {m: round(report["methods"][m]["zsl"]["hit@5"], 4) for m in methods}}))


if __name__ == "__main__":
    main()
