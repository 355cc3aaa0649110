"""What the generic trainer needs from a model + data: the `Task` protocol and its lookup.

The trainer (fusion_jax.train.loop) knows nothing about FUSION. A task supplies:

  batch_axes            {batch key: logical axes}, e.g. {"input_ids": ("batch", "length")};
                        every array the data iterator yields must be listed (the leading axis
                        is the batch axis and is split over hosts and microbatches)
  loss_weights          {part: weight}; total loss = sum_k weight_k * sum_k / denominator_k
  init_params(rng)      the 'params' collection, leaves boxed with nn.Partitioned logical
                        names (nn.with_logical_partitioning); plain arrays are replicated
  loss_fn(params, batch, rng) -> (sums, aux)
                        sums: {part: fp32 scalar SUM over the (micro)batch}, e.g. summed token
                        NLL; aux: {name: scalar} extra metrics, SUMMED over microbatches (an
                        aux 'tokens' = real tokens in the batch drives tokens/s and MFU)
  loss_denominators(batch) -> {part: scalar}
                        the normaliser of each part over the whole GLOBAL batch, computed from
                        the batch alone (e.g. number of supervised tokens). Because it does not
                        depend on the parameters the trainer computes it before accumulating
                        microbatch gradients, which makes k microbatches exactly equal to one
                        step on the k-times batch (mean-of-means would not be).
  make_data_iterator(process_index, process_count)
                        this host's iterator of batches of global_batch / process_count
                        examples (dicts of NumPy arrays) with get_state() -> JSON-able dict,
                        set_state(state), optional `counters` ({name: int}, e.g. skipped
                        samples per reason) and optional close()
  flops_per_token()     training FLOPs per token (forward + backward) for MFU, or None
  adapt_params(tree)    optional: a stored params tree (init_from) in this task's parameter
                        layout (FUSION: unrolled <-> scanned layers)
  check_batch(batch)    optional: raises ValueError (one line naming the key and the fix) when
                        a host batch breaks the task's batch contract; the trainer calls it on
                        the first batch of every run, before the step compiles
  num_examples          dataset size for config.num_epochs, or None

The factory may carry `preflight(checks, config, data)`: the task's own startup checks (files
the config names, ...), run before anything is built (fusion_jax/train/preflight.py).

config.task names the factory `factory(config) -> Task`: either 'package.module:factory'
(imported on first use; e.g. experiments/toy.py's 'experiments.toy:ToyTask') or a short name
that a task module registers for itself when it is imported:

  task_lib.register_task("fusion", FusionTask)      # in fusion_jax/task/fusion.py

An unregistered short name is looked up as the module fusion_jax.task.<name> (imported, so that
it registers itself): a config read back from a workdir's JSON needs no import of its own.

This module names no task: the experiment config says which one runs.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import ml_collections
import numpy as np

Batch = Mapping[str, Any]


@runtime_checkable
class DataIterator(Protocol):
  """Host batches with a resumable state."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]: ...

  def set_state(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
  """See the module docstring."""

  batch_axes: Mapping[str, tuple[str | None, ...]]
  loss_weights: Mapping[str, float]
  num_examples: int | None

  def init_params(self, rng: jax.Array) -> Any: ...

  def loss_fn(self, params: Any, batch: Batch, rng: jax.Array
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]: ...

  def loss_denominators(self, batch: Batch) -> dict[str, jax.Array]: ...

  def make_data_iterator(self, process_index: int, process_count: int) -> DataIterator: ...

  def flops_per_token(self) -> float | None: ...


TaskFactory = Callable[[ml_collections.ConfigDict], Task]
# name -> factory, or 'module:attr' imported on first use (keeps heavy imports lazy); filled by
# the task modules themselves (register_task), never here.
TASKS: dict[str, TaskFactory | str] = {}


def register_task(name: str, factory: TaskFactory | str) -> None:
  """Makes `config.task = name` build `factory(config)`."""
  TASKS[name] = factory


def _import(spec: str) -> TaskFactory:
  module, _, attr = spec.partition(":")
  if not attr:
    raise ValueError(f"task factory {spec!r} must look like 'package.module:factory'")
  try:
    return getattr(importlib.import_module(module), attr)
  except ModuleNotFoundError as e:
    if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
      raise  # the task module itself lacks a dependency
    raise ValueError(f"config.task={spec!r}: no module {e.name!r} on the Python path (run from "
                     "the repository root, or add the module's folder to PYTHONPATH)") from None


def _import_own_task(name: str) -> None:
  """Imports fusion_jax.task.<name> when it exists: the package's own tasks register themselves
  on import, and a config read back from JSON (a workdir's, a subprocess's) imported nothing."""
  if not name.isidentifier():
    return
  module = f"fusion_jax.task.{name}"
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise  # the task module itself lacks a dependency


def task_factory(config: ml_collections.ConfigDict) -> TaskFactory:
  """The factory named by config.task (a registered name, the name of one of fusion_jax.task's
  modules, which registers itself, or 'module:factory')."""
  name = config.task
  if name not in TASKS and ":" not in name:
    _import_own_task(name)
  if name in TASKS:
    factory = TASKS[name]
    return _import(factory) if isinstance(factory, str) else factory
  if ":" in name:
    return _import(name)
  raise ValueError(f"config.task={name!r} is not registered; known tasks: {sorted(TASKS)} "
                   "(a task module registers its name when imported; or give "
                   "'package.module:factory')")


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by config.task, built from `config`."""
  return task_factory(config)(config)
