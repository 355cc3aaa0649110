"""`train(config, workdir)`: the generic sharded training loop.

  validate config -> mesh -> abstract params + shardings -> optimizer
  -> restore the latest complete checkpoint in <workdir>/checkpoints (exact resume: params,
     optimizer, step, rng, counters, data iterator position), or init (+ `init_from` params)
  -> for each step: host batch -> global arrays -> jitted step -> metrics (one step behind,
     so the host never waits on the device) -> checkpoint every N steps
  -> SIGTERM: save at the current step and return (exit code 0); multi-host runs use orbax's
     preemption sync point so that every host saves the same step
  -> K consecutive non-finite steps: NonFiniteError naming the last checkpoint before them
  -> final checkpoint, loss-curve PNG, summary dict

Reading order: Setup / setup (everything derived from the config), train (the run, top to
bottom), then its steps in call order: _announce, _restore_or_init, _Run (the step loop), and
the small host-side helpers (_counters, _sum_over_processes, _Preemption). The model is the
task's business (fusion_jax/train/task.py); nothing here knows which one runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fusion_jax.parallel.sharding import make_mesh, normalize_rules, param_shardings
from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train.init_from import restore_params
from fusion_jax.train import config as config_lib
from fusion_jax.train import metrics as metrics_lib
from fusion_jax.train import optimizer as optim_lib
from fusion_jax.train import state as state_lib
from fusion_jax.train import step as step_lib
from fusion_jax.train import task as task_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before any array exists (shared by train() and tests).

  Attributes:
    mesh, rules: device mesh and logical axis rules.
    num_steps: optimizer steps of the run.
    tx, labels, trainable, schedule: optimizer, its label tree ('freeze' / 'lr_x<m>'), the
      bool tree of trainable leaves and the base learning-rate schedule.
    shardings: TrainState of NamedShardings; target: abstract TrainState (restore target).
    batch_shardings: NamedSharding per batch key.
  """
  config: ml_collections.ConfigDict
  task: task_lib.Task
  mesh: jax.sharding.Mesh
  rules: list[tuple[str, Any]]
  num_steps: int
  tx: Any
  labels: Any
  trainable: Any
  schedule: Any
  shardings: state_lib.TrainState
  target: state_lib.TrainState
  batch_shardings: dict[str, Any]
  init_rng: jax.Array
  step_rng: jax.Array

  def init_state(self) -> state_lib.TrainState:
    """Fresh sharded state: params initialised directly in their shardings."""
    task, tx = self.task, self.tx

    def init_fn(rng_params, rng_state):
      params = nn.unbox(task.init_params(rng_params))
      return state_lib.create_state(params, tx, rng_state)

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(init_fn, out_shardings=self.shardings)(self.init_rng, self.step_rng)

  def make_step(self, donate: bool = True):
    return step_lib.make_train_step(
        self.task, self.tx, self.mesh, self.rules, state_shardings=self.shardings,
        trainable=self.trainable, microbatches=int(self.config.microbatches),
        schedule=self.schedule, donate=donate)

  def global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return step_lib.to_global_batch(host_batch, self.batch_shardings,
                                    int(self.config.global_batch))


def setup(config: ml_collections.ConfigDict, task: task_lib.Task | None = None,
          devices: Sequence[jax.Device] | None = None) -> Setup:
  """Validates `config` against `devices` (default: all) and derives the Setup."""
  task = task if task is not None else task_lib.make_task(config)
  devices = list(jax.devices() if devices is None else devices)
  sizes = config_lib.validate_config(config, num_devices=len(devices))
  mesh = make_mesh(sizes, devices)
  rules = normalize_rules(config.rules)
  num_steps = config_lib.resolve_num_steps(config, getattr(task, "num_examples", None))
  root = jax.random.key(int(config.seed))
  init_rng, step_rng = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  # Parameters: shapes and shardings without materialising anything.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init_params, init_rng)
  abstract_params = nn.unbox(boxed)
  tx, labels = optim_lib.make_optimizer(config.optim, abstract_params, num_steps)
  shardings = state_lib.state_shardings(tx, abstract_params, param_shardings(boxed, mesh, rules),
                                        mesh)
  return Setup(
      config=config, task=task, mesh=mesh, rules=rules, num_steps=num_steps, tx=tx,
      labels=labels, trainable=optim_lib.frozen_mask(labels),
      schedule=optim_lib.make_schedule(config.optim, num_steps), shardings=shardings,
      target=state_lib.abstract_state(tx, abstract_params, shardings),
      batch_shardings=step_lib.batch_shardings(task, mesh, rules),
      init_rng=init_rng, step_rng=step_rng)


def train(config: ml_collections.ConfigDict, workdir: str,
          task: task_lib.Task | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints).

  Returns a summary dict: step (reached), num_steps, preempted, resumed_from (step or None),
  checkpoint_step (newest saved), checkpoint_dir, nonfinite_total, last (the last metrics
  record), wall_time_s, init_from (report dict or None), loss_curve (PNG path or None).
  Raises NonFiniteError after config.max_nonfinite consecutive non-finite steps.
  """
  t_start = time.time()
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)  # orbax requires absolute checkpoint paths
  su = setup(config, task)
  _announce(su, workdir)
  ck = config.checkpoint
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), keep_last=int(ck.keep_last),
                               keep_every=int(ck.keep_every), async_save=bool(ck.async_save))
  state, resumed_from, data_state, init_report = _restore_or_init(su, ckpt)
  it = su.task.make_data_iterator(jax.process_index(), jax.process_count())
  if data_state:
    it.set_state(data_state)
  run = _Run(su, workdir, ckpt, it, state, resumed_from)
  try:
    run.steps()
  finally:
    run.close()

  curve = metrics_lib.plot_loss_curve(workdir) if jax.process_index() == 0 else None
  summary = dict(
      step=run.done, num_steps=su.num_steps, preempted=run.preempted, resumed_from=resumed_from,
      checkpoint_step=run.last_saved, checkpoint_dir=ckpt.directory,
      nonfinite_total=int(jax.device_get(run.state.nonfinite_total)), last=run.last_record,
      wall_time_s=time.time() - t_start, init_from=init_report, loss_curve=curve)
  logging.info("training summary: %s", {k: v for k, v in summary.items() if k != "last"})
  return summary


def _announce(su: Setup, workdir: str) -> None:
  """Creates the workdir (process 0; gs:// too) and logs the mesh, steps and parameters."""
  config = su.config
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info("mesh %s over %d devices (%d processes); %d steps of global batch %d (%d "
               "microbatches)", dict(su.mesh.shape), jax.device_count(), jax.process_count(),
               su.num_steps, config.global_batch, config.microbatches)
  logging.info("parameters per optimizer label: %s",
               optim_lib.label_summary(su.target.params, su.labels))


def _restore_or_init(su: Setup, ckpt: ckpt_lib.Checkpointer
                     ) -> tuple[state_lib.TrainState, int | None, Any, dict[str, int] | None]:
  """(state, resumed_from, data_state, init_from report) of the run's start.

  The newest step that restores completely (damaged newer steps are logged and moved aside);
  without one, a fresh state, with the parameters of config.init_from when it is set.
  """
  config = su.config
  restored = ckpt.restore_latest(su.target, restore_data=bool(config.checkpoint.restore_data))
  if restored is not None:
    step, state, data_state = restored
    logging.info("resumed from %s/%d", ckpt.directory, step)
    return state, step, data_state, None
  state = su.init_state()
  if not config.init_from:
    return state, None, None, None
  params, report = restore_params(config.init_from, su.target.params,
                                           fresh_params=state.params,
                                           adapt=getattr(su.task, "adapt_params", None))
  return state.replace(params=params), None, None, {k: len(v) for k, v in report.items()}


def _metrics_writer(su: Setup, workdir: str, start: int) -> metrics_lib.MetricsWriter:
  """Metrics of process 0, with MFU when the task knows its FLOPs and the device its peak."""
  task = su.task
  fpt = task.flops_per_token() if hasattr(task, "flops_per_token") else None
  peak = config_lib.peak_flops_per_device(su.config)
  return metrics_lib.MetricsWriter(
      workdir, num_steps=su.num_steps, start_step=start, enabled=jax.process_index() == 0,
      flops_per_token=fpt, peak_flops=None if peak is None else peak * jax.device_count())


class _Run:
  """The step loop of one train() call and what it carries between steps.

  Metrics are processed one step late (the host never waits on the device); a checkpoint is
  written every config.checkpoint.every steps, at the last step, on preemption, and again for
  the last step when the data iterator runs dry after it.
  """

  def __init__(self, su: Setup, workdir: str, ckpt: ckpt_lib.Checkpointer, it: Any,
               state: state_lib.TrainState, resumed_from: int | None):
    config = su.config
    self.su, self.ckpt, self.it, self.state = su, ckpt, it, state
    self.num_steps = su.num_steps
    self.train_step = su.make_step()
    self.start = self.done = int(jax.device_get(state.step))
    self.writer = _metrics_writer(su, workdir, self.start)
    self.trace = None
    if config.trace_batch_key:
      os.makedirs(os.path.join(workdir, "trace"), exist_ok=True)
      self.trace = open(os.path.join(workdir, "trace", f"process_{jax.process_index()}.jsonl"),
                        "a")
    self.config_json = json.loads(config.to_json_best_effort())
    self.preemption = _Preemption()
    self.last_saved = resumed_from
    self.saved_data: dict[str, Any] | None = None
    self.last_record: dict[str, Any] = {}
    self.preempted = False

  def steps(self) -> None:
    """Steps start .. num_steps; stops early when preempted or when the data runs dry."""
    config = self.su.config
    every = int(config.checkpoint.every)
    if self.start >= self.num_steps:
      logging.info("nothing to do: the checkpoint is at step %d of %d", self.start,
                   self.num_steps)
    pending = None  # (step, device metrics, data counters) of the step before
    for s in range(self.start, self.num_steps):
      try:
        host = next(self.it)
      except StopIteration:
        self.stop_data_ran_dry(pending)
        return
      if s == self.start:
        self.check_first_batch(host)
      self.state, metrics = self.train_step(self.state, self.su.global_batch(host))
      self.done = s + 1
      self.write_trace(host)
      counters = _counters(self.it)
      if pending is not None:
        self.process(*pending)
      pending = (self.done, metrics, counters)
      if (every and self.done % every == 0) or self.done == self.num_steps:
        self.save(self.done)
      if self.done < self.num_steps and self.preemption.reached(self.ckpt, self.done):
        self.stop_preempted(pending)
        return
    if pending is not None:
      self.process(*pending)

  def check_first_batch(self, host: Mapping[str, np.ndarray]) -> None:
    """The task's batch contract on the run's first host batch (NumPy, before the step
    compiles): a pipeline or config mismatch fails here in one line, not deep in jit."""
    check = getattr(self.su.task, "check_batch", None)
    if check is not None:
      check(host)

  def stop_data_ran_dry(self, pending: tuple[int, Any, dict[str, int]] | None) -> None:
    """The data iterator ended before num_steps: the last step is recorded and saved."""
    logging.warning("the data iterator ended after %d of %d steps; stopping here (raise "
                    "the data epochs or lower num_steps)", self.done, self.num_steps)
    if pending is not None:
      # Skips after the last batch were counted while the iterator ran dry: the final
      # record and the checkpoint both take the counters as they are now.
      self.process(*pending[:2], _counters(self.it), force=True)
      self.save(self.done, overwrite=True)

  def stop_preempted(self, pending: tuple[int, Any, dict[str, int]]) -> None:
    """SIGTERM (or the multi-host sync point): the step is recorded and saved."""
    self.process(*pending, force=True)
    self.save(self.done)
    self.preempted = True
    logging.warning("preempted at step %d: checkpoint saved, exiting", self.done)

  def write_trace(self, host: Mapping[str, np.ndarray]) -> None:
    """The batch's config.trace_batch_key values (e.g. sample ids) for data-order audits."""
    if self.trace is None:
      return
    ids = np.asarray(host[self.su.config.trace_batch_key]).tolist()
    self.trace.write(json.dumps({"step": self.done, "ids": ids}) + "\n")
    self.trace.flush()

  def save(self, step: int, overwrite: bool = False) -> None:
    """Checkpoints `step` once; `overwrite` re-saves it if the data state moved since."""
    data = self.it.get_state()
    if self.last_saved == step and not (overwrite and data != self.saved_data):
      return
    self.ckpt.save(self.state, step=step, data_state=data, config=self.config_json,
                   overwrite=overwrite)
    self.last_saved, self.saved_data = step, data

  def process(self, done: int, metrics: Any, counters: dict[str, int],
              force: bool = False) -> None:
    """Host side of a finished step (called one step late); `force` logs it regardless of
    log_every (the last record of a run)."""
    m = jax.device_get(metrics)
    if (force or done == self.start + 1 or done % int(self.su.config.log_every) == 0
        or done == self.num_steps):
      self.last_record = self.writer.write(done, m, _sum_over_processes(counters))
    self.check_nonfinite(done, m)

  def check_nonfinite(self, done: int, m: Mapping[str, Any]) -> None:
    """NonFiniteError once config.max_nonfinite consecutive steps were skipped."""
    max_bad = int(self.su.config.max_nonfinite)
    streak = int(m["nonfinite_streak"])
    if not (max_bad and streak >= max_bad):
      return
    self.ckpt.wait()
    good = [s for s in self.ckpt.all_steps() if s <= done - streak]
    where = (f"{self.ckpt.directory}/{max(good)}" if good else
             "none (no checkpoint was saved before the streak began)")
    raise NonFiniteError(
        f"{streak} consecutive steps with a non-finite loss or gradient (steps "
        f"{done - streak + 1}..{done}); their updates were skipped "
        f"({int(m['nonfinite_total'])} skipped in total). Last good checkpoint: {where}. "
        "Check the data around these steps or lower optim.lr; to resume from that checkpoint, "
        "remove the newer step directories (if any) and rerun the same command; "
        "config.max_nonfinite sets the limit.")

  def close(self) -> None:
    """Restores the SIGTERM handler; closes the trace, checkpointer, metrics and data."""
    self.preemption.restore()
    if self.trace is not None:
      self.trace.close()
    self.ckpt.close()
    self.writer.close()
    close = getattr(self.it, "close", None)
    if close is not None:
      close()


def _counters(it: Any) -> dict[str, int]:
  """The data iterator's optional `counters` ({name: int}, an attribute or a method)."""
  c = getattr(it, "counters", None)
  if c is None:
    return {}
  c = c() if callable(c) else c
  return {k: int(v) for k, v in c.items()}


def _sum_over_processes(counters: dict[str, int]) -> dict[str, int]:
  """This host's counters summed over all processes (every process must call it)."""
  if jax.process_count() == 1 or not counters:
    return counters
  from jax.experimental import multihost_utils
  keys = sorted(counters)
  total = multihost_utils.process_allgather(np.asarray([counters[k] for k in keys], np.int64))
  return dict(zip(keys, np.asarray(total).reshape(-1, len(keys)).sum(0).tolist()))


class _Preemption:
  """SIGTERM -> flag (single process). Multi-host runs ask orbax's preemption sync point,
  which every host reaches at the same step, instead of a per-host flag."""

  def __init__(self):
    self.flag = threading.Event()
    self._prev = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: saving a checkpoint and exiting", signum)
    self.flag.set()

  def reached(self, ckpt: ckpt_lib.Checkpointer, step: int) -> bool:
    if jax.process_count() > 1:
      return ckpt.reached_preemption(step)
    return self.flag.is_set()

  def restore(self) -> None:
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)
      self._prev = None
