#!/usr/bin/env bash
# Run fusion_jax on every host of a Cloud TPU VM slice (e.g. v5p-128: 64 chips, 16 hosts).
#
#   export TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-project   # PROJECT optional
#   launch/tpu_pod.sh setup                  # copy this checkout + install, on every host
#   launch/tpu_pod.sh train experiments/fusion_3b.py:stage1 gs://BUCKET/fusion_3b/stage1 \
#       [--config.KEY=VALUE ...]
#
# `train` runs, on every host at once (same command everywhere; jax.distributed finds the
# other hosts through the TPU metadata, hence --multihost=true):
#   python -m fusion_jax.train --multihost=true --config CONFIG --workdir WORKDIR [overrides]
# Rerunning the same `train` command resumes from the newest checkpoint in WORKDIR.
#
# Env: TPU_NAME, ZONE (required); PROJECT; REPO_DIR (checkout on the hosts, default
# fusion_jax under the home dir); PYTHON (>= 3.11 for the pinned numpy / jax, default
# python3.11); DETACH=1 runs `train` under nohup (log: ~/fusion_jax_train.log per host)
# so it survives a dropped ssh session.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-fusion_jax}
PYTHON=${PYTHON:-python3.11}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then WHERE+=(--project="$PROJECT"); fi

on_all_hosts() {  # run one shell command line on every host
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$1"
}

case "${1:-}" in
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    jax_version=$(sed -n 's/^jax==//p' "$root/requirements.txt")
    archive=$(mktemp -d)/fusion_jax.tgz
    tar -czf "$archive" -C "$root" --exclude=.git --exclude=.venv --exclude=.cache \
        --exclude='*.egg-info' --exclude=runs .
    "${GCLOUD[@]}" scp "$archive" "$TPU_NAME":fusion_jax.tgz "${WHERE[@]}"
    # The pinned CPU jax from requirements.txt plus the TPU runtime (libtpu) of the same version.
    on_all_hosts "set -e; mkdir -p $REPO_DIR && tar -xzf fusion_jax.tgz -C $REPO_DIR \
      && cd $REPO_DIR && $PYTHON -m venv .venv && . .venv/bin/activate \
      && pip install -q --upgrade pip && pip install -q -r requirements.txt \
      && pip install -q 'jax[tpu]==$jax_version' && pip install -q --no-deps -e . \
      && python -c 'import jax, fusion_jax; print(\"fusion_jax ready, jax\", jax.__version__)'"
    ;;
  train)
    if [[ $# -lt 3 ]]; then
      echo "usage: $0 train CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" >&2
      exit 2
    fi
    shift
    cmd=$(printf '%q ' python -m fusion_jax.train --multihost=true \
          --config "$1" --workdir "$2" "${@:3}")
    if [[ "${DETACH:-0}" == 1 ]]; then
      cmd="nohup $cmd < /dev/null > ~/fusion_jax_train.log 2>&1 &"
    fi
    on_all_hosts "cd $REPO_DIR && . .venv/bin/activate && $cmd"
    ;;
  *)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac
