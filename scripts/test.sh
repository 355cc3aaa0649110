#!/usr/bin/env bash
# Runs the test suite (what README and CI call). Uses the venv when present.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export FUSION_JAX_TEST_CACHE="$PWD/.cache/jax"
python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
