#!/usr/bin/env bash
# Every GPU measurement in one run (< 6 minutes on one H100): features from uint8 (cold, from the store)
# against the raw jitted forward, decode-only JPEG throughput, training epochs on cached features vs
# recomputing the backbone, and ranking top-k vs a full sort. Each prints a RESULT {json} line.
# Usage (on the GPU machine, after ./setup.sh):  bash benchmarks/gpu.sh 2>&1 | tee gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import devise, jax; print('devices:', jax.devices())"
echo "== features (emoji PNGs), bf16 on GPU =="
timeout 150 $PY benchmarks/features.py --images 4096 --repeats 3 --per-image 64
echo "== features (JPEG photos: decode-bound) =="
timeout 120 $PY benchmarks/features.py --images 2048 --repeats 2 --photos --per-image 16
echo "== training on cached features vs recomputing the backbone =="
timeout 120 $PY benchmarks/train.py
echo "== ranking: top-k over 100K labels =="
timeout 90 $PY benchmarks/ranking.py
