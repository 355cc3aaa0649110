"""Command line: `python -m fusion_jax.train --config experiments/NAME.py[:ARG] --workdir DIR`.

Config fields can be overridden with `--config.KEY=VALUE` (ml_collections config flags), e.g.
`--config.num_steps=100 --config.optim.lr=1e-5 --config.init_from=/runs/stage1`.
The config is checked before anything is built (fusion_jax.train.preflight): each mistake is one
line on stderr and the exit status is 2 (`--verbose` adds the tracebacks).
On a multi-host slice run the same command on every host: jax.distributed is initialised when
the environment describes a multi-process job (or with --multihost=true).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fusion_jax.parallel.distributed import multihost_requested

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/NAME.py[:ARG]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.")
_MULTIHOST = flags.DEFINE_enum(
    "multihost", "auto", ["auto", "true", "false"],
    "Call jax.distributed.initialize(): auto = when the environment names a multi-process job "
    "(JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, multi-host Cloud TPU). Elsewhere set "
    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.")
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "Show the traceback behind each configuration error (startup checks).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fusion_jax.train.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
  import jax
  if multihost_requested(_MULTIHOST.value):
    from fusion_jax.parallel import distributed
    try:
      distributed.initialize()
    except ValueError as e:  # a missing / malformed coordinator, process count or id
      raise app.UsageError(f"--multihost: {e}") from None
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  # Every file the config names and every field, before any model init or compile: one line
  # per mistake and exit status 2, nothing created in the workdir.
  from fusion_jax.train import preflight
  try:
    preflight.require(_CONFIG.value, _WORKDIR.value,
                      config_file=config_flags.get_config_filename(flags.FLAGS["config"]))
  except preflight.ConfigError as e:
    sys.exit(preflight.report(e, "fusion_jax.train", _VERBOSE.value))
  from fusion_jax.train import checkpoint as ckpt_lib
  from fusion_jax.train.loop import train
  try:
    summary = train(_CONFIG.value, _WORKDIR.value)
  except (ckpt_lib.NoRestorableCheckpointError, ckpt_lib.CheckpointMismatchError) as e:
    # The message already names the steps and what to do: one clear error, not a traceback.
    if _VERBOSE.value:
      raise
    print(f"fusion_jax.train: error: {e}", file=sys.stderr)
    sys.exit(2)
  if summary["preempted"]:
    logging.warning("preempted at step %d; rerun the same command to resume", summary["step"])
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
