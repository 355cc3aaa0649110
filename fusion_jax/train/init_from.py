"""`init_from`: parameters alone from another run's checkpoint or a model dir, re-sharded.

A later stage starts from the previous stage's weights with a fresh optimizer (docs/model.md
§10); a run starts from import_hf's model dir. Either source is read item `params` only, leaf by
leaf onto this run's shardings; parameters the source lacks keep their fresh init (new FUSION
modules), and a source stored in another parameter layout (unrolled vs scanned layers) is read
once on the host and converted by the task's `adapt_params`. Resuming a run's own state is
fusion_jax.train.checkpoint's job.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fusion_jax.train.checkpoint import CHECKPOINT_SUBDIR, finalized_steps
from fusion_jax.train.optimizer import path_str


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
  from fusion_jax.convert import model_dir  # the layout conversion writes; imported on use
  if model_dir.is_model_dir(path):
    return str(epath.Path(path) / model_dir.PARAMS_NAME)
  return None


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}."""
  nested: dict[str, Any] = {}
  for name, leaf in flat.items():
    node = nested
    keys = name.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return nested


def _restore_adapted(handler: Any, params_dir: str, meta_tree: Any,
                     adapt: Callable[[Any], Any]) -> dict[str, Any] | None:
  """The whole saved tree on the host, adapted to this run's layout ({name: array}); None when
  `adapt` leaves the saved names unchanged (same layout: restore leaf by leaf instead).

  Used when the source stored another parameter layout (e.g. unrolled layers into a scanned
  run): the tree is read once onto one CPU device, converted, then placed leaf by leaf.
  """
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu),
                        meta_tree, is_leaf=lambda x: hasattr(x, "shape"))
  if set(_flat(jax.eval_shape(adapt, target))) == set(_flat(target)):
    return None
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  return _flat(adapt(handler.restore(epath.Path(params_dir), args=args)))


def _flat(tree: Any) -> dict[str, Any]:
  """{'a/b': leaf} of a nested tree."""
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _place_adapted(adapted: Mapping[str, Any], flat: list[Any], treedef: Any,
                   fresh_params: Any | None, where: str) -> tuple[Any, dict[str, list[str]]]:
  """Target leaves from an adapted host tree (shape-checked, put on the target shardings)."""
  fresh_flat = jax.tree.leaves(fresh_params) if fresh_params is not None else [None] * len(flat)
  leaves, fresh, restored = [], [], []
  for (p, leaf), fresh_leaf in zip(flat, fresh_flat):
    name = path_str(p)
    if name not in adapted:
      if fresh_params is None:
        raise ValueError(f"init_from {where}: parameter {name} missing from the checkpoint")
      fresh.append(name)
      leaves.append(fresh_leaf)
      continue
    x = adapted[name]
    if tuple(x.shape) != tuple(leaf.shape):
      raise ValueError(
          f"init_from {where}: parameter {name} has shape {tuple(x.shape)} in the checkpoint "
          f"(after layout conversion) but {tuple(leaf.shape)} in this model; the configs differ")
    restored.append(name)
    leaves.append(jax.device_put(jnp.asarray(x, leaf.dtype), leaf.sharding))
  unused = sorted(set(adapted) - set(restored))
  logging.info("init_from %s (layout converted): %d parameters restored, %d fresh, %d unused",
               where, len(restored), len(fresh), len(unused))
  return treedef.unflatten(leaves), dict(restored=restored, fresh=fresh, unused=unused)


def restore_params(path: str, target_params: Any, fresh_params: Any | None = None,
                   adapt: Callable[[Any], Any] | None = None
                   ) -> tuple[Any, dict[str, list[str]]]:
  """Parameters from another run's checkpoint, re-sharded onto `target_params`' shardings.

  Args:
    path: workdir, checkpoints directory or step directory of the source run, or a model dir
      (fusion_jax.convert.model_dir, e.g. the stage-1 start written by convert.import_hf).
    target_params: abstract params (ShapeDtypeStructs with shardings) of this run.
    fresh_params: this run's freshly initialised params; parameters the checkpoint lacks keep
      these values (new modules start from random init). None: every parameter must exist.
    adapt: converts a saved tree to this run's parameter layout (Task.adapt_params, e.g.
      unrolled <-> scanned layers); None = the layouts must match.

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
  adapted = None if adapt is None else _restore_adapted(handler, params_dir, meta_tree, adapt)
  if adapted is not None:
    handler.close()
    return _place_adapted(adapted, flat, treedef, fresh_params, where)
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
  nested = _nest(restore_target)
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
