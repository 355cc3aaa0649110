"""Orbax checkpoints of the training state: async saves, keep policies, resume, re-sharding.

Layout: `<workdir>/checkpoints/<step>/` with one orbax item per part, so a later stage can read
the parameters alone (`init_from`) without touching the optimizer state:

  params      fp32 master parameters (sharded tensorstore arrays)
  opt_state   optax state (frozen parameters have none)
  train       step, rng, non-finite counters
  data        the data iterator state, one JSON file per process (process_<i>-of-<n>.json),
              snapshotted at save time (the iterator keeps running while the save commits)
  config      the experiment config as JSON (for humans and for `init_from` checks)

A step directory only gets its final name once every item is committed, so the newest
`<step>` directory is always complete (a run killed mid-save leaves an `*.orbax-checkpoint-tmp*`
directory that is ignored and cleaned up on the next start). Restores take a target tree of
`jax.ShapeDtypeStruct`s carrying the NEW shardings: a checkpoint saved on one mesh restores onto
any other mesh of the same devices count or not (tensorstore reads each shard's slice).
"""
from __future__ import annotations

import dataclasses
import json
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
      found = sorted(p.name for p in directory.iterdir())
      raise ValueError(
          f"checkpoint data state {path} not found (files: {found}); the checkpoint was saved "
          "with a different number of processes, restart with the same process count or set "
          "config.checkpoint.restore_data=False to start the data from scratch")
    return json.loads(path.read_text())

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
           config: Mapping[str, Any] | None = None) -> int:
    """Starts saving `state` as checkpoint `step` (default: state.step).

    Async: returns once the arrays are copied to host; the commit runs in the background.
    """
    step = int(jax.device_get(state.step)) if step is None else int(step)
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
    """
    items = dict(
        params=ocp.args.StandardRestore(target.params),
        opt_state=ocp.args.StandardRestore(target.opt_state),
        train=ocp.args.StandardRestore(target.counters()))
    if restore_data:
      items["data"] = DataStateRestore()
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match the configured model/optimizer "
          f"({e}). Resuming needs the same model and optim.rules; start a new stage from it "
          "with --config.init_from instead.") from e
    state = target.replace(params=out["params"], opt_state=out["opt_state"])
    state = state.replace_counters(out["train"])
    return state, (out["data"] if restore_data else None)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption sync point (all hosts agree to save at the same step)."""
    return self._mngr.reached_preemption(step)

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


# ----------------------------------------------------------------------------- init_from


def finalized_steps(root: str) -> list[int]:
  """Sorted steps of the complete (finalized) checkpoints directly under `root`."""
  return sorted(ocp.path.step.checkpoint_steps(root))


def _resolve_source(path: str) -> tuple[str, int]:
  """`path` may be a workdir, its checkpoints/ directory, or one step directory."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"init_from: {path} does not exist")
  if (p / "params").exists() and p.name.isdigit():
    return str(p.parent), int(p.name)
  for root in (p / CHECKPOINT_SUBDIR, p):
    if root.exists():
      steps = finalized_steps(str(root))
      if steps:
        return str(root), max(steps)
  raise FileNotFoundError(
      f"init_from: no complete checkpoint under {path} (expected <dir>/checkpoints/<step>/params "
      "or <dir>/<step>/params)")


def _model_dir_params(path: str) -> str | None:
  """`path`/params when `path` is a fusion_jax model dir (fusion_jax.convert.model_dir)."""
  p = epath.Path(path)
  if (p / "fusion_config.json").exists() and (p / "params").is_dir():
    return str(p / "params")
  return None


def restore_params(path: str, target_params: Any, fresh_params: Any | None = None
                   ) -> tuple[Any, dict[str, list[str]]]:
  """Parameters from another run's checkpoint, re-sharded onto `target_params`' shardings.

  Args:
    path: workdir, checkpoints directory or step directory of the source run, or a model dir
      (fusion_jax.convert.model_dir, e.g. the stage-1 start written by convert.import_hf).
    target_params: abstract params (ShapeDtypeStructs with shardings) of this run.
    fresh_params: this run's freshly initialised params; parameters the checkpoint lacks keep
      these values (new modules start from random init). None: every parameter must exist.

  Returns:
    (params, report) with report = {"restored": [...], "fresh": [...], "unused": [...]} paths.
  """
  params_dir = _model_dir_params(path)
  where = path
  if params_dir is None:
    root, step = _resolve_source(path)
    where = f"{root}/{step}"
    params_dir = str(epath.Path(root) / str(step) / "params")
  # The params item alone, read by its own handler: a CheckpointManager (or Checkpointer) would
  # warn about every other item of the step (opt_state, data, config) and the step metadata.
  handler = ocp.PyTreeCheckpointHandler()
  meta = handler.metadata(epath.Path(params_dir))
  meta_tree = getattr(meta, "tree", meta)
  saved = {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      meta_tree, is_leaf=lambda x: hasattr(x, "shape"))[0]}
  flat, treedef = jax.tree_util.tree_flatten_with_path(target_params)
  restore_target: dict[str, Any] = {}
  fresh, restored = [], []
  for p, leaf in flat:
    name = path_str(p)
    if name not in saved:
      fresh.append(name)
      continue
    if tuple(saved[name].shape) != tuple(leaf.shape):
      raise ValueError(
          f"init_from {where}: parameter {name} has shape {tuple(saved[name].shape)} in "
          f"the checkpoint but {tuple(leaf.shape)} in this model; the model configs differ")
    restored.append(name)
    restore_target[name] = leaf
  if fresh and fresh_params is None:
    raise ValueError(f"init_from {where}: parameters missing from the checkpoint: "
                     f"{fresh[:10]}{' ...' if len(fresh) > 10 else ''}")
  unused = sorted(set(saved) - set(restored))
  # Nested target with only the restorable leaves (orbax partial restore).
  nested: dict[str, Any] = {}
  for name, leaf in restore_target.items():
    node = nested
    keys = name.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  args = ocp.args.PyTreeRestore(
      item=nested, restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
      partial_restore=True)
  out = handler.restore(epath.Path(params_dir), args=args)
  handler.close()
  fresh_flat = (jax.tree.leaves(fresh_params) if fresh_params is not None
                else [None] * len(flat))
  leaves = []
  for (p, _), fresh_leaf in zip(flat, fresh_flat):
    node = out
    for k in path_str(p).split("/"):
      node = node.get(k) if isinstance(node, Mapping) else None
      if node is None:
        break
    leaves.append(fresh_leaf if node is None else node)
  logging.info("init_from %s: %d parameters restored, %d fresh, %d unused in checkpoint",
               where, len(restored), len(fresh), len(unused))
  return treedef.unflatten(leaves), dict(restored=restored, fresh=fresh, unused=unused)
