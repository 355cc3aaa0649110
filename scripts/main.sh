#!/usr/bin/env bash
# The main job on a fresh machine: set up a venv (runtime requirements only, no torch), then
# synthesize the default dataset, train a tiny FUSION on CPU, evaluate, checkpoint and export.
#   bash scripts/main.sh [WORKDIR] [extra flags, e.g. --config.num_steps=300]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/smoke}
shift || true
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec python -m fusion_jax.run --config experiments/smoke.py --workdir "$WORKDIR" "$@"
