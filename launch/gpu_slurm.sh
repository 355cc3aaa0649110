#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, each seeing all of its node's GPUs.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh experiments/fusion_3b.py:stage1 \
#       /shared/runs/fusion_3b/stage1 [--config.KEY=VALUE ...]
#
# Every task runs `python -m fusion_jax.train --multihost=auto ...`; with SLURM_NTASKS > 1 the
# trainer calls jax.distributed.initialize(), whose SLURM detection takes the coordinator (first
# node of the step), process count and process id from SLURM's environment. WORKDIR must be on
# a filesystem every node sees. Resubmitting the same command resumes from its newest checkpoint.
# Env: REPO_DIR (checkout, default the submit dir), VENV (default $REPO_DIR/.venv, with
# requirements.txt and jax[cuda12] of the pinned version installed).
#SBATCH --job-name=fusion_jax
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@600
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: sbatch $0 CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO_DIR"
# shellcheck disable=SC1091
. "${VENV:-$REPO_DIR/.venv}/bin/activate"
# Let XLA take most of each GPU (the default preallocates 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# --signal=TERM@600 sends SIGTERM to every task 10 minutes before the time limit: the trainer
# saves a checkpoint at the step all processes agree on and exits 0 (resubmit to continue).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    python -m fusion_jax.train --multihost=auto --config "$CONFIG" --workdir "$WORKDIR" "$@"
