"""Orbax checkpoints of the training state: async saves, keep policies, resume, re-sharding.

Layout: `<workdir>/checkpoints/<step>/` with one orbax item per part, so a later stage can read
the parameters alone (`init_from`, fusion_jax/train/init_from.py) without touching the
optimizer state:

  params      fp32 master parameters (sharded tensorstore arrays)
  opt_state   optax state (frozen parameters have none)
  train       step, rng, non-finite counters
  data        the data iterator state, one JSON file per process (process_<i>-of-<n>.json),
              snapshotted at save time (the iterator keeps running while the save commits)
  config      the experiment config as JSON (for humans and for `init_from` checks)

A step directory only gets its final name once every item is committed, so the newest
`<step>` directory is always complete (a run killed mid-save leaves an `*.orbax-checkpoint-tmp*`
directory that is ignored and cleaned up on the next start). A step damaged AFTER its commit
(disk fault, truncated copy, a deleted file) is caught by `restore_latest`: it walks back to
the newest step that restores completely and moves each damaged step, untouched, to
`<checkpoints>_damaged/<step>` (kept for inspection; a later save of the same step number
must not collide with it). A step that is readable but built for another model / optimizer is
a config error (`CheckpointMismatchError`), not damage. Restores take a target tree of
`jax.ShapeDtypeStruct`s carrying the NEW shardings: a checkpoint saved on one mesh restores onto
any other mesh of the same devices count or not (tensorstore reads each shard's slice).
"""
from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from fusion_jax.train.optimizer import path_str
from fusion_jax.train.state import TrainState

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUFFIX = "_damaged"  # <checkpoints>_damaged/<step>: damaged steps moved out of the way


class CheckpointMismatchError(ValueError):
  """A readable checkpoint built for another model, optimizer or process count."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint step that cannot be read completely (truncated, corrupt or missing files)."""


class NoRestorableCheckpointError(RuntimeError):
  """Every checkpoint step of a run is damaged."""


def _not_orbax_info(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint) from absl's log
  handler; its warnings stay. For command lines whose progress lines come from the trainer."""
  logging.get_absl_handler().addFilter(_not_orbax_info)


# ----------------------------------------------------------------------------- data item


class DataStateHandler(ocp.CheckpointHandler):
  """Saves a JSON-serialisable data-iterator state, one file per process.

  Like grain's own orbax handler (grain.checkpoint.CheckpointHandler) but it takes a state
  snapshot instead of the live iterator: with async checkpointing the iterator moves on while
  the save commits, and any iterator with get_state()/set_state() works.
  """

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: DataStateSave) -> None:
    self._file(directory).write_text(json.dumps(args.state, indent=1, sort_keys=True))

  def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
    path = self._file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
      counts = {n.rsplit("-of-", 1)[-1][:-len(".json")] for n in found
                if n.startswith("process_") and n.endswith(".json") and "-of-" in n}
      if counts and str(jax.process_count()) not in counts:
        raise CheckpointMismatchError(
            f"checkpoint data state {path} not found (files: {found}): the checkpoint was saved "
            f"by {'/'.join(sorted(counts))} processes, this run has {jax.process_count()}; "
            "restart with the same process count or set config.checkpoint.restore_data=False "
            "to start the data from scratch")
      raise CheckpointDamagedError(f"data state file {path.name} is missing (files: {found})")
    try:
      return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointDamagedError(f"data state file {path.name} is not valid JSON ({e})") from e

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------- manager


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` with the items described above.

  Args:
    directory: the checkpoints directory.
    keep_last: keep the newest K checkpoints (0 = keep all).
    keep_every: additionally keep every checkpoint whose step is a multiple of M (0 = none).
    async_save: commit saves in a background thread (the arrays are copied to host first, so
      the next train step may donate the state buffers right away).
  """

  def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int = 0,
               async_save: bool = True):
    self.directory = directory
    policies: list[Any] = [ocp_managers.LatestN(keep_last if keep_last > 0 else None)]
    if keep_every > 0:
      policies.append(ocp_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies))
    self._mngr = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    """Newest complete (finalized) checkpoint step, None if there is none."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, state: TrainState, *, step: int | None = None,
           data_state: Mapping[str, Any] | None = None,
           config: Mapping[str, Any] | None = None, overwrite: bool = False) -> int:
    """Starts saving `state` as checkpoint `step` (default: state.step).

    Async: returns once the arrays are copied to host; the commit runs in the background.
    overwrite: replace an existing checkpoint of the same step (e.g. the last step re-saved
    with the data state of an iterator that has since run dry).
    """
    step = int(jax.device_get(state.step)) if step is None else int(step)
    if overwrite and step in self.all_steps():
      self._mngr.wait_until_finished()
      self._mngr.delete(step)
    items = dict(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave(state.counters()),
        data=DataStateSave(dict(data_state or {})),
        config=ocp.args.JsonSave(dict(config or {})))
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    return step

  def restore(self, step: int, target: TrainState, *, restore_data: bool = True
              ) -> tuple[TrainState, dict[str, Any] | None]:
    """Restores step `step` onto the shardings of `target` (abstract state).

    Returns (state, data_state or None).
    Raises:
      CheckpointMismatchError: the step is readable but has other parameter / optimizer shapes
        (another model or optim.rules) or another process count.
      CheckpointDamagedError: any part (params, opt_state, train, data, config) cannot be read.
    """
    step_dir = epath.Path(self.directory) / str(step)
    where = f"{self.directory}/{step}"
    mismatch = _shape_mismatch(step_dir, target)
    if mismatch:
      raise CheckpointMismatchError(
          f"checkpoint {where} does not match the configured model/optimizer ({mismatch}). "
          "Resuming needs the same model and optim.rules; start a new stage from it with "
          "--config.init_from instead.")
    data = DataStateHandler().restore(step_dir / "data") if restore_data else None
    try:
      json.loads((step_dir / "config" / "metadata").read_text())
    except (OSError, ValueError) as e:  # missing, unreadable or not JSON
      raise CheckpointDamagedError(f"config item unreadable ({_short(e)})") from e
    items = dict(
        params=ocp.args.StandardRestore(target.params),
        opt_state=ocp.args.StandardRestore(target.opt_state),
        train=ocp.args.StandardRestore(target.counters()))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore raises bare Exception for truncated / corrupt chunks
      raise CheckpointDamagedError(_short(e)) from e
    state = target.replace(params=out["params"], opt_state=out["opt_state"])
    state = state.replace_counters(out["train"])
    return state, data

  def restore_latest(self, target: TrainState, *, restore_data: bool = True
                     ) -> tuple[int, TrainState, dict[str, Any] | None] | None:
    """(step, state, data_state) of the newest step that restores completely; None if none exist.

    Damaged steps on the way are logged with the reason; once an older step restores they are
    moved to `<checkpoints>_damaged/<step>` (never deleted). A mismatch (another model or
    optimizer) stops at once: it is a config error, older steps would not match either.
    Raises NoRestorableCheckpointError when every step is damaged (nothing is moved then).
    """
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, target, restore_data=restore_data)
        error = ""
      except CheckpointDamagedError as e:
        state, data, error = None, None, str(e)
      if _all_processes_ok(not error):
        for s, _ in damaged:  # only once a good step is found: a failing disk moves nothing
          self._move_damaged(s)
        if damaged:
          logging.warning("resuming from %s/%d, the newest checkpoint that restores completely; "
                          "damaged newer steps %s moved to %s", self.directory, step,
                          [s for s, _ in damaged], self._damaged_dir())
        return step, state, data
      error = error or "damaged on another process"
      logging.error("checkpoint %s/%d is damaged: %s; trying the previous step",
                    self.directory, step, error)
      damaged.append((step, error))
    if damaged:
      listing = "; ".join(f"step {s}: {r}" for s, r in damaged)
      raise NoRestorableCheckpointError(
          f"no checkpoint in {self.directory} restores completely ({listing}). Nothing was "
          "moved or deleted. To start this run from scratch, move the step directories out of "
          "the checkpoints directory; to keep trained weights, put an intact copy of a step "
          "there, or start a new run with --config.init_from=<an intact step directory>.")
    return None

  def _damaged_dir(self) -> epath.Path:
    return epath.Path(str(self.directory).rstrip("/") + DAMAGED_SUFFIX)

  def _move_damaged(self, step: int) -> None:
    """Moves step `step` out of the checkpoints directory (process 0), then all processes
    re-read the step list."""
    if jax.process_index() == 0:
      dst_root = self._damaged_dir()
      dst_root.mkdir(parents=True, exist_ok=True)
      dst, n = dst_root / str(step), 1
      while dst.exists():
        dst, n = dst_root / f"{step}-{n}", n + 1
      (epath.Path(self.directory) / str(step)).rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"fusion_jax_damaged_checkpoint_{step}")
    self._mngr.reload()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (all hosts agree to save at the same step)."""
    return self._mngr.reached_preemption(step)

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _short(e: BaseException, limit: int = 300) -> str:
  """First line of an exception (tensorstore appends a whole JSON spec), capped."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  text = text.split(" See full TensorStore details")[0]
  cause = e.__cause__ or e.__context__
  if cause is not None and str(cause).strip():
    text += f" <- {str(cause).strip().splitlines()[0]}"
  return text if len(text) <= limit else text[:limit] + "..."


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (all hosts agree on which step to resume)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  import numpy as np
  flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.asarray(flags).all())


def _shapes(item_dir: epath.Path) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a saved pytree item, from its metadata alone."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(item_dir)
  finally:
    handler.close()
  tree = getattr(meta, "tree", meta)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {path_str(p): tuple(m.shape) for p, m in flat}


def _shape_mismatch(step_dir: epath.Path, target: TrainState) -> str:
  """What differs between the saved shapes of `step_dir` and `target` ('' = nothing).

  Raises CheckpointDamagedError when an item or its metadata cannot be read.
  """
  parts = (("params", target.params), ("opt_state", target.opt_state),
           ("train", target.counters()))
  for item, tree in parts:
    if not (step_dir / item).exists():
      raise CheckpointDamagedError(f"item {item}/ is missing")
    try:
      saved = _shapes(step_dir / item)
    except Exception as e:  # a corrupt _METADATA raises whatever its parser raises
      raise CheckpointDamagedError(f"{item} unreadable ({_short(e)})") from e
    want = {path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if item == "params":
      diff = sorted(set(saved.items()) ^ set(want.items()))
      if diff:
        name = diff[0][0]
        return (f"parameter {name}: checkpoint {saved.get(name, 'absent')}, model "
                f"{want.get(name, 'absent')}; {len({n for n, _ in diff})} parameters differ")
    elif sorted(saved.values()) != sorted(want.values()):  # optax key paths differ in form
      return (f"{item}: {len(saved)} arrays in the checkpoint, {len(want)} configured, or "
              "their shapes differ")
  return ""


def finalized_steps(root: str) -> list[int]:
  """Sorted steps of the complete (finalized) checkpoints directly under `root`."""
  return sorted(ocp.path.step.checkpoint_steps(root))
