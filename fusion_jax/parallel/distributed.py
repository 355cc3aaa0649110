"""jax.distributed.initialize() from the environment, with explicit variables for any cluster.

`multihost_requested(mode)` says whether to initialise at all (--multihost=auto/true/false).

jax detects SLURM, Open MPI and multi-host Cloud TPU (including GKE TPU pods) by itself, and
reads JAX_COORDINATOR_ADDRESS, but not the process count and id. Where no detector applies
(several processes on one machine, a bare Kubernetes Job, a custom launcher) set all three:

  JAX_COORDINATOR_ADDRESS   host:port of process 0 (e.g. localhost:12345)
  JAX_NUM_PROCESSES         number of processes
  JAX_PROCESS_ID            this process's index, 0 .. JAX_NUM_PROCESSES - 1
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number "
                     f"(see fusion_jax/parallel/distributed.py)") from None


def initialize_args(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
  """Keyword arguments for jax.distributed.initialize() from ENV_VARS (unset ones omitted,
  so jax's cluster detection fills them). Raises ValueError on malformed or partial values."""
  args: dict[str, Any] = {}
  address = environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
  if address:
    if ":" not in address:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} needs a port: host:port "
                       "(e.g. localhost:12345)")
    args["coordinator_address"] = address
  num, pid = _int_env(environ, "JAX_NUM_PROCESSES"), _int_env(environ, "JAX_PROCESS_ID")
  if (num is None) != (pid is None):
    raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, to let jax "
                     f"detect them); got JAX_NUM_PROCESSES={num}, JAX_PROCESS_ID={pid}")
  if num is not None:
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
    if not address:
      raise ValueError("JAX_NUM_PROCESSES / JAX_PROCESS_ID need JAX_COORDINATOR_ADDRESS "
                       "(host:port of process 0)")
    args.update(num_processes=num, process_id=pid)
  return args


# Environment variables that mean "this process is one of several" (jax's cluster detection
# handles the details of each once jax.distributed.initialize() is called).
_MULTI_PROCESS_ENV = (
    ("JAX_COORDINATOR_ADDRESS", None),
    ("SLURM_NTASKS", lambda v: int(v) > 1),
    ("OMPI_COMM_WORLD_SIZE", lambda v: int(v) > 1),
    ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),
    ("MEGASCALE_COORDINATOR_ADDRESS", None),
)


def multihost_requested(mode: str, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether to call jax.distributed.initialize() for --multihost=`mode` (auto/true/false)."""
  if mode != "auto":
    return mode == "true"
  for var, check in _MULTI_PROCESS_ENV:
    value = environ.get(var)
    if value and (check is None or check(value)):
      return True
  return False


def initialize(environ: Mapping[str, str] = os.environ) -> None:
  """jax.distributed.initialize() with `initialize_args(environ)`."""
  jax.distributed.initialize(**initialize_args(environ))
