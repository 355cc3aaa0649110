"""Train step: sharded == single device, microbatch accumulation, freezing / per-module LR,
non-finite skip; optimizer schedule and config validation."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.models import query_len
from fusion_jax.parallel import distributed
from fusion_jax.train import config as config_lib
from fusion_jax.train import optimizer as optim_lib
from experiment_helpers import load_experiment, override
from fusion_jax.train.loop import setup
from experiments.toy import ToyTask

ONE_DEVICE = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}


def toy_config(**overrides):
  """experiments/toy.py with dotted-key overrides (like --config.KEY=VALUE)."""
  c = load_experiment("toy")
  c.global_batch = 8
  c.num_steps = 10
  c.optim.warmup_frac = 0.0
  c.optim.lr = 1e-2
  return override(c, **overrides)


def host_batches(config, n):
  it = ToyTask(config).make_data_iterator(0, 1)
  return [next(it) for _ in range(n)]


def run_steps(su, batches, donate=False):
  state = su.init_state()
  step = su.make_step(donate=donate)
  metrics = []
  for b in batches:
    state, m = step(state, su.global_batch(b))
    metrics.append(jax.device_get(m))
  return state, metrics


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_sharded_step_equals_single_device():
  # eps 1e-4, as in test_microbatches_equal_one_big_batch: Adam's g / (|g| + eps) would turn the
  # two programs' different summation orders, on entries whose gradient nearly cancels, into
  # O(lr) differences (1.1e-5 on 1 of 1024 entries with the default eps).
  cfg8 = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optim.eps": 1e-4})
  cfg1 = toy_config(**{**ONE_DEVICE, "optim.eps": 1e-4})
  batches = host_batches(cfg8, 2)
  su8 = setup(cfg8)
  su1 = setup(cfg1, devices=jax.devices()[:1])
  assert dict(su8.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  # Parameters really are split over the tensor / fsdp axes.
  spec = su8.shardings.params["block_0"]["query"]["kernel"].spec
  assert spec == jax.P("fsdp", "tensor", None)
  s8, m8 = run_steps(su8, batches)
  s1, m1 = run_steps(su1, batches)
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-5)
  for a, b in zip(leaves(s8.params), leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert m8[1]["loss"] < m8[0]["loss"] + 1.0  # a real update happened, not NaN
  assert not np.allclose(leaves(s8.params)[0], leaves(su8.init_state().params)[0])


def test_microbatches_equal_one_big_batch():
  # eps 1e-4: Adam's update g / (|g| + eps) turns rounding differences of entries whose
  # microbatch gradients nearly cancel (|g| ~ 1e-8) into O(lr) differences; a larger eps keeps
  # the comparison about accumulation rather than about that amplification.
  base = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "global_batch": 16,
          "optim.eps": 1e-4}
  cfg_k = toy_config(microbatches=4, **base)
  cfg_1 = toy_config(microbatches=1, **base)
  (batch,) = host_batches(cfg_1, 1)
  # The microbatches have different numbers of supervised tokens, so a mean of microbatch
  # means would differ from the global mean: the test can tell.
  counts = [(batch["labels"][j::4, 1:] != -100).sum() for j in range(4)]
  assert len(set(counts)) > 1
  sk, (mk,) = run_steps(setup(cfg_k), [batch])
  s1, (m1,) = run_steps(setup(cfg_1), [batch])
  np.testing.assert_allclose(mk["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(mk["grad_norm"], m1["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(mk["tokens"], m1["tokens"])
  for a, b in zip(leaves(sk.params), leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_unchanged_and_lr_multiplier_applied():
  cfg = toy_config(**{"optim.rules": (("^embed$", "freeze"), ("^block_0/", 0.1)),
                      "optim.schedule": "constant", "optim.eps": 1e-12, **ONE_DEVICE})
  su = setup(cfg, devices=jax.devices()[:1])
  assert optim_lib.label_summary(su.target.params, su.labels)["freeze"] == 64 * 32
  state0 = su.init_state()
  p0 = jax.device_get(state0.params)
  # Frozen parameters carry no optimizer state.
  opt_paths = [optim_lib.path_str(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state0.opt_state)[0]]
  assert not [p for p in opt_paths if p.endswith("/embed")]
  assert [p for p in opt_paths if p.endswith("block_0/query/kernel")]
  state, metrics = run_steps(su, host_batches(cfg, 2))
  p2 = jax.device_get(state.params)
  np.testing.assert_array_equal(p2["embed"], p0["embed"])
  # Adam's first steps move every weight by ~lr * multiplier: compare module medians.
  lr = cfg.optim.lr

  def med(name):
    d = [np.abs(p2[name][k]["kernel"] - p0[name][k]["kernel"]).ravel()
         for k in ("query", "key", "value", "out")]
    return float(np.median(np.concatenate(d)))

  ratio = med("block_0") / med("block_1")
  assert 0.095 < ratio < 0.105, ratio
  assert med("block_1") == pytest.approx(2 * lr, rel=0.2)
  assert metrics[-1]["lr"] == pytest.approx(lr)


class PoisonTask(ToyTask):
  """Toy task whose loss is NaN when any sample of the batch carries poison=True."""

  def __init__(self, config):
    super().__init__(config)
    self.batch_axes = dict(self.batch_axes, poison=("batch",))

  def loss_fn(self, params, batch, rng):
    sums, aux = super().loss_fn(params, batch, rng)
    bad = jnp.any(batch["poison"])
    return {k: jnp.where(bad, jnp.nan, v) for k, v in sums.items()}, aux


def test_nonfinite_step_is_skipped_and_counted():
  cfg = toy_config(**ONE_DEVICE)
  su = setup(cfg, task=PoisonTask(cfg), devices=jax.devices()[:1])
  step = su.make_step(donate=False)
  clean = host_batches(cfg, 3)
  poison = lambda b, v: dict(b, poison=np.full((8,), v))  # noqa: E731
  s0 = su.init_state()
  s1, m1 = step(s0, su.global_batch(poison(clean[0], True)))
  assert int(m1["skipped"]) == 1 and int(s1.nonfinite_total) == 1
  assert int(s1.nonfinite_streak) == 1 and int(s1.step) == 1
  for a, b in zip(leaves((s1.params, s1.opt_state)), leaves((s0.params, s0.opt_state))):
    np.testing.assert_array_equal(a, b)
  s2, m2 = step(s1, su.global_batch(poison(clean[1], True)))
  assert int(s2.nonfinite_streak) == 2 and int(s2.nonfinite_total) == 2
  s3, m3 = step(s2, su.global_batch(poison(clean[2], False)))
  assert int(m3["skipped"]) == 0 and math.isfinite(float(m3["loss"]))
  assert int(s3.nonfinite_streak) == 0 and int(s3.nonfinite_total) == 2 and int(s3.step) == 3
  assert not np.array_equal(leaves(s3.params)[1], leaves(s0.params)[1])


def test_schedule_warmup_cosine():
  sched = optim_lib.make_schedule({"lr": 1.0, "warmup_frac": 0.1}, 100)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(55)) == pytest.approx(0.5, abs=1e-6)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)
  assert optim_lib.warmup_steps({"warmup_frac": 0.03}, 1000) == 30


def test_param_labels_rules():
  params = {"vision_tower": {"w": 0}, "mm_projector": {"w": 0}, "llm": {"embed": 0}}
  labels = optim_lib.param_labels(
      params, (("^vision_tower/", 0.1), ("^mm_projector/", "freeze")))
  assert labels == {"vision_tower": {"w": "lr_x0.1"}, "mm_projector": {"w": "freeze"},
                    "llm": {"embed": "lr_x1.0"}}
  with pytest.raises(ValueError, match="must be a float or 'freeze'"):
    optim_lib.param_labels(params, (("x", "slow"),))
  with pytest.raises(ValueError, match="bad regex"):
    optim_lib.param_labels(params, (("(", 1.0),))


@pytest.mark.parametrize("overrides, match", [
    ({"mesh.data": 3}, "do not divide the 8 devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, "product of axis sizes"),
    ({"global_batch": 12, "microbatches": 1}, "not divisible by the 8 batch shards"),
    ({"global_batch": 16, "microbatches": 4}, "microbatch of 4 examples"),
    ({"global_batch": 16, "microbatches": 3}, "not divisible by microbatches=3"),
    ({"remat_policy": "some"}, "unknown remat policy"),
    ({"compute_dtype": "fp8"}, "compute_dtype"),
    ({"optim.warmup_frac": 1.5}, "warmup_frac"),
    ({"num_steps": 0, "num_epochs": 0.0}, "both num_steps and num_epochs are 0"),
    ({"rules": (("batch", "dp"),)}, "not in"),
])
def test_config_validation_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(toy_config(**overrides), num_devices=8, process_count=1)


def test_config_validation_ok_and_epochs():
  cfg = toy_config(**{"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2})
  assert config_lib.validate_config(cfg, 8, 1) == {"data": 2, "fsdp": 2, "tensor": 2}
  cfg.num_steps = 0
  cfg.num_epochs = 1.5
  assert config_lib.resolve_num_steps(cfg, 100) == math.ceil(150 / 8)


def test_latent_geometry():
  query_len.check((4, 16, 36, 64, 144), "config.model", window=3, mosaic_side=54)
  with pytest.raises(ValueError, match="not a perfect square"):
    query_len.check((4, 15), "config.model", window=3, mosaic_side=54)
  with pytest.raises(ValueError, match="exceeds the tile mosaic side 30"):
    query_len.check((4, 144), "config.model", window=3, mosaic_side=30)


def test_task_registry():
  from fusion_jax.train import task as task_lib
  assert isinstance(task_lib.make_task(toy_config()), ToyTask)
  cfg = toy_config(task="experiments.toy:ToyTask")
  assert isinstance(task_lib.make_task(cfg), task_lib.Task)
  with pytest.raises(ValueError, match="is not registered; known tasks"):
    task_lib.make_task(toy_config(task="nope"))


def test_own_task_names_resolve_without_importing_their_module():
  # A fresh interpreter that never imported fusion_jax.task.fusion (a config read back from a
  # workdir's JSON, a benchmark's training subprocess) still finds config.task = "fusion".
  code = ("import sys, ml_collections\n"
          "from fusion_jax.train import task\n"
          "assert 'fusion_jax.task.fusion' not in sys.modules\n"
          "f = task.task_factory(ml_collections.ConfigDict({'task': 'fusion'}))\n"
          "print(f.__module__, f.__name__)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split() == ["fusion_jax.task.fusion", "FusionTask"]


def test_multihost_detection():
  assert not distributed.multihost_requested("auto", {})
  assert not distributed.multihost_requested("auto", {"SLURM_NTASKS": "1"})
  assert distributed.multihost_requested("auto", {"SLURM_NTASKS": "4"})
  assert distributed.multihost_requested("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert distributed.multihost_requested("auto", {"TPU_WORKER_HOSTNAMES": "h0,h1"})
  assert distributed.multihost_requested("true", {})
  assert not distributed.multihost_requested("false", {"SLURM_NTASKS": "4"})
