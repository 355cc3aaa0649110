#!/usr/bin/env bash
# Run fusion_jax on a multi-host TPU slice of a GKE cluster (e.g. v5p-128: 16 hosts x 4 chips).
#
#   launch/gke_xpk.sh jobset TPU_TYPE CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]
#       prints launch/gke_tpu_jobset.yaml filled in for TPU_TYPE; apply it with
#       `| kubectl apply -f -` (needs the JobSet controller on the cluster)
#   launch/gke_xpk.sh xpk TPU_TYPE CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]
#       submits the same command with xpk (`pip install xpk`), which writes its own JobSet
#   launch/gke_xpk.sh topology TPU_TYPE
#       prints "ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST" for TPU_TYPE
#
# Both run, on every host of the slice:
#   python -m fusion_jax.train --multihost=true --config CONFIG --workdir WORKDIR [overrides]
# jax.distributed finds the coordinator (worker 0) and the process ids through the
# TPU_WORKER_HOSTNAMES / TPU_WORKER_ID that GKE gives every pod of a TPU slice.
# Rerunning (or a JobSet restart) resumes from the newest checkpoint in WORKDIR (gs://...).
#
# TPU_TYPE is the Cloud TPU name: v5p-N and v4-N (N TensorCores = 2 x chips), v6e-N and
# v5litepod-N (alias v5e-N; N chips). Only multi-host slices of 4-chip hosts are listed.
# Env: IMAGE (required: a container with this checkout at /app, its requirements and jax[tpu];
# launch/tpu.Dockerfile), JOB_NAME (default fusion-jax), MAX_RESTARTS (default 3);
# for xpk also CLUSTER (required), PROJECT, ZONE.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

usage() {
  sed -n '2,22p' "$0" >&2
  exit 2
}

# TPU_TYPE -> "accelerator topology hosts chips_per_host" (GKE node labels of the slice).
topology() {
  local accel dims
  case "$1" in
    v5p-*) accel=tpu-v5p-slice ;;
    v4-*) accel=tpu-v4-podslice ;;
    v6e-*) accel=tpu-v6e-slice ;;
    v5litepod-* | v5e-*) accel=tpu-v5-lite-podslice ;;
    *) echo "unknown TPU type '$1': use v5p-N, v4-N, v6e-N or v5litepod-N (e.g. v5p-128)" >&2
       return 2 ;;
  esac
  case "$1" in
    v5p-16 | v4-16) dims=2x2x2 ;;
    v5p-32 | v4-32) dims=2x2x4 ;;
    v5p-64 | v4-64) dims=2x4x4 ;;
    v5p-128 | v4-128) dims=4x4x4 ;;
    v5p-256 | v4-256) dims=4x4x8 ;;
    v5p-512 | v4-512) dims=4x8x8 ;;
    v5p-1024 | v4-1024) dims=8x8x8 ;;
    v5p-2048 | v4-2048) dims=8x8x16 ;;
    *-16) dims=4x4 ;;
    *-32) dims=4x8 ;;
    *-64) dims=8x8 ;;
    *-128) dims=8x16 ;;
    *-256) dims=16x16 ;;
    *) echo "TPU type '$1' is not a multi-host slice listed here; use e.g. v5p-128, v6e-64," \
            "v5litepod-256 (or write the JobSet's topology by hand)" >&2
       return 2 ;;
  esac
  local chips=$(( ${dims//x/*} ))
  echo "$accel $dims $(( chips / 4 )) 4"
}

# Fills the ${NAME} placeholders of the JobSet template from the named shell variables.
render() {
  local out name
  out=$(<"$here/gke_tpu_jobset.yaml")
  for name in JOB_NAME IMAGE TPU_ACCELERATOR TPU_TOPOLOGY NUM_HOSTS CHIPS_PER_HOST \
              TRAIN_ARGS MAX_RESTARTS; do
    out=${out//"\${$name}"/"${!name}"}
  done
  if grep -v '^[[:space:]]*#' <<<"$out" | grep -q '\${'; then
    echo "gke_tpu_jobset.yaml has a placeholder this script does not fill" >&2
    return 1
  fi
  printf '%s\n' "$out"
}

cmd=${1:-}
case "$cmd" in
  topology)
    [[ $# -eq 2 ]] || usage
    topology "$2"
    ;;
  jobset | xpk)
    [[ $# -ge 4 ]] || usage
    tpu_type=$2
    read -r TPU_ACCELERATOR TPU_TOPOLOGY NUM_HOSTS CHIPS_PER_HOST < <(topology "$tpu_type") \
      || exit 2
    [[ -n "${TPU_ACCELERATOR:-}" ]] || exit 2
    TRAIN_ARGS=$(printf '%q ' --config "$3" --workdir "$4" "${@:5}")
    TRAIN_ARGS=${TRAIN_ARGS% }
    : "${IMAGE:?set IMAGE to the training container image (see launch/README.md)}"
    JOB_NAME=${JOB_NAME:-fusion-jax}
    MAX_RESTARTS=${MAX_RESTARTS:-3}
    if [[ $cmd == jobset ]]; then
      render
    else
      : "${CLUSTER:?set CLUSTER to the GKE cluster name}"
      where=()
      if [[ -n "${PROJECT:-}" ]]; then where+=(--project="$PROJECT"); fi
      if [[ -n "${ZONE:-}" ]]; then where+=(--zone="$ZONE"); fi
      xpk workload create --cluster="$CLUSTER" "${where[@]}" --workload="$JOB_NAME" \
        --tpu-type="$tpu_type" --num-slices=1 --docker-image="$IMAGE" \
        --max-restarts="$MAX_RESTARTS" \
        --command="python -m fusion_jax.train --multihost=true $TRAIN_ARGS"
    fi
    ;;
  *)
    usage
    ;;
esac
