"""Common experiment config fields, their defaults, and startup validation with clear errors.

Every experiments/*.py starts from `base_config()` and overrides what it needs. Fields:

  task            the task factory: 'package.module:factory' or a name its module registered
                  (fusion_jax/train/task.py)
  model, data     task-specific ConfigDicts (read by the task factory only)
  mesh            data / fsdp / tensor sizes; one may be -1 (= the remaining devices)
  rules           ((logical axis, mesh axes or None), ...) first match wins
  optim           lr, schedule ('cosine' | 'constant'), warmup_frac (or warmup_steps > 0),
                  end_lr_frac, b1, b2, eps, weight_decay, decay_exclude (regex, '' = decay
                  all), clip_norm (0 = off), rules ((regex, lr multiplier | 'freeze'), ...)
  global_batch    examples per optimizer step, over all hosts
  microbatches    gradient accumulation steps per optimizer step (global_batch / k each)
  num_steps       optimizer steps; 0 = derive from num_epochs and the task's num_examples
  num_epochs      used when num_steps == 0
  checkpoint      every (steps, 0 = only at the end / on preemption), keep_last,
                  keep_every (keep steps that are multiples of it; 0 = off), async_save,
                  restore_data (restore the data iterator state on resume)
  log_every       steps between progress lines / metric records
  seed            parameter init, data order (task-specific) and per-step RNG
  init_from       '' or a run dir / checkpoints dir / step dir: params only, fresh optimizer
  max_nonfinite   abort after this many consecutive non-finite steps (0 = never)
  compute_dtype   'bfloat16' | 'float32' activations and matmuls (params stay float32)
  remat_policy    fusion_jax.parallel.remat policy name ('none', 'full', 'dots', ...)
  loss_chunks     1, or project the LM head and take the cross entropy in this many token
                  chunks, recomputed in the backward pass: the (B, S, V) fp32 logits never
                  exist (fusion_jax.parallel.cross_entropy.lm_head_cross_entropy); must
                  divide the sequence length
  peak_tflops_per_device  for the MFU estimate; 0 = from the device kind (unknown: no MFU)
  trace_batch_key '' or a batch key (e.g. sample ids) logged per step to
                  <workdir>/trace/process_<i>.jsonl for data-order audits
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fusion_jax.parallel import devices
from fusion_jax.parallel.sharding import DEFAULT_RULES, MESH_AXES, mesh_axes_of, resolve_mesh_shape


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (docs/model.md §10: AdamW, wd 0, cosine, 3% warmup)."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.model = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.rules = tuple((k, v) for k, v in DEFAULT_RULES)
  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-5, schedule="cosine", warmup_frac=0.03, warmup_steps=0, end_lr_frac=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, decay_exclude="", clip_norm=1.0,
      rules=()))
  c.global_batch = 128
  c.microbatches = 1
  c.num_steps = 0
  c.num_epochs = 1.0
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=1000, keep_last=3, keep_every=0, async_save=True, restore_data=True))
  c.log_every = 10
  c.seed = 0
  c.init_from = ""
  c.max_nonfinite = 20
  c.compute_dtype = "bfloat16"
  c.remat_policy = "none"
  c.loss_chunks = 1
  c.peak_tflops_per_device = 0.0
  c.trace_batch_key = ""
  return c


def _err(key: str, msg: str) -> ValueError:
  return ValueError(f"config.{key}: {msg}")


def resolve_dtype(name: str) -> jnp.dtype:
  """'bfloat16' / 'float32' / 'float16' -> dtype, with the valid names on error."""
  names = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
  if name not in names:
    raise _err("compute_dtype", f"{name!r} is not one of {sorted(names)}")
  return names[name]


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{'data': d, 'fsdp': f, 'tensor': t} with -1 resolved; errors name the config keys."""
  sizes = {}
  for axis in MESH_AXES:
    if axis not in config.mesh:
      raise _err("mesh", f"missing axis {axis!r}; set mesh.data, mesh.fsdp, mesh.tensor")
    sizes[axis] = int(config.mesh[axis])
  extra = set(config.mesh.keys()) - set(MESH_AXES)
  if extra:
    raise _err("mesh", f"unknown axes {sorted(extra)}; the mesh axes are {MESH_AXES}")
  for axis, v in sizes.items():
    if v == 0 or v < -1:
      raise _err(f"mesh.{axis}", f"size {v} must be a positive integer or -1")
  try:
    return resolve_mesh_shape(sizes, num_devices)
  except ValueError as e:
    raise _err("mesh", str(e)) from None


def batch_shards(config: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> int:
  """How many ways the 'batch' logical axis is split on the mesh."""
  axes = next((axes for name, axes in config.rules if name == "batch"), None)
  return int(math.prod(sizes[a] for a in mesh_axes_of(axes)))


def validate_rules(rules: Sequence[Sequence[Any]]) -> None:
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise _err(f"rules[{i}]", f"{rule!r} must be (logical name, mesh axis / axes / None)")
    bad = [a for a in mesh_axes_of(rule[1]) if a not in MESH_AXES]
    if bad:
      raise _err(f"rules[{i}]", f"mesh axes {bad} of {rule!r} are not in {MESH_AXES}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int | None = None) -> dict[str, int]:
  """Checks the common fields against the devices; returns the resolved mesh sizes.

  Raises ValueError naming the config key and the fix for: mesh product vs devices, batch
  not divisible by the batch shards / microbatches / processes, bad dtype / remat / schedule
  fields, bad checkpoint or step counts.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  if not config.task:
    raise _err("task", "empty; name the task factory, e.g. 'experiments.toy:ToyTask' or a "
               "registered name such as 'fusion'")
  validate_rules(config.rules)
  sizes = mesh_shape(config, num_devices)
  gb, k = int(config.global_batch), int(config.microbatches)
  if gb <= 0:
    raise _err("global_batch", f"{gb} must be positive")
  if k <= 0:
    raise _err("microbatches", f"{k} must be positive")
  if gb % k:
    raise _err("global_batch", f"{gb} is not divisible by microbatches={k}")
  shards = batch_shards(config, sizes)
  if (gb // k) % shards:
    raise _err("global_batch",
               f"the microbatch of {gb // k} examples (global_batch {gb} / microbatches {k}) "
               f"is not divisible by the {shards} batch shards (mesh {sizes}, batch rule); "
               f"make global_batch a multiple of {shards * k}")
  if gb % process_count:
    raise _err("global_batch", f"{gb} is not divisible by the {process_count} processes")
  if int(config.num_steps) < 0:
    raise _err("num_steps", f"{config.num_steps} must be >= 0")
  if int(config.num_steps) == 0 and float(config.num_epochs) <= 0:
    raise _err("num_steps", "both num_steps and num_epochs are 0; set one of them")
  resolve_dtype(config.compute_dtype)
  from fusion_jax.parallel import remat as remat_lib  # local: keeps config import light
  try:
    remat_lib.policy_from_name(config.remat_policy)
  except ValueError as e:
    raise _err("remat_policy", str(e)) from None
  if int(config.get("loss_chunks", 1)) < 1:
    raise _err("loss_chunks", f"{config.loss_chunks} must be >= 1 (1 = unchunked)")
  o = config.optim
  if float(o.lr) < 0:
    raise _err("optim.lr", f"{o.lr} must be >= 0")
  if not 0.0 <= float(o.warmup_frac) <= 1.0:
    raise _err("optim.warmup_frac", f"{o.warmup_frac} must be in [0, 1]")
  if o.schedule not in ("cosine", "constant"):
    raise _err("optim.schedule", f"{o.schedule!r} must be 'cosine' or 'constant'")
  if not (0.0 <= float(o.b1) < 1.0 and 0.0 <= float(o.b2) < 1.0):
    raise _err("optim.b1/b2", f"({o.b1}, {o.b2}) must be in [0, 1)")
  from fusion_jax.train.optimizer import check_rules  # same checks make_optimizer runs
  try:
    check_rules(o.rules)
  except ValueError as e:
    raise _err("optim.rules", str(e)) from None
  ck = config.checkpoint
  for key in ("every", "keep_last", "keep_every"):
    if int(ck[key]) < 0:
      raise _err(f"checkpoint.{key}", f"{ck[key]} must be >= 0")
  if int(config.log_every) <= 0:
    raise _err("log_every", f"{config.log_every} must be positive")
  if int(config.max_nonfinite) < 0:
    raise _err("max_nonfinite", f"{config.max_nonfinite} must be >= 0")
  return sizes


def resolve_num_steps(config: ml_collections.ConfigDict, num_examples: int | None) -> int:
  """config.num_steps, or ceil(num_epochs * num_examples / global_batch) when it is 0."""
  if int(config.num_steps) > 0:
    return int(config.num_steps)
  if not num_examples:
    raise _err("num_steps", "is 0 and the task does not know its dataset size "
               "(num_examples); set num_steps explicitly")
  return int(math.ceil(float(config.num_epochs) * num_examples / int(config.global_batch)))


def peak_flops_per_device(config: ml_collections.ConfigDict) -> float | None:
  """Configured or looked-up peak FLOP/s of one device (the table: fusion_jax.parallel.devices);
  None when unknown (e.g. CPU)."""
  if float(config.peak_tflops_per_device) > 0:
    return float(config.peak_tflops_per_device) * 1e12
  return devices.peak_flops(jax.devices()[0].device_kind)
