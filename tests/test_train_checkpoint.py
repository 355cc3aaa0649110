"""Checkpoints in process: restore onto another mesh, init_from, non-finite abort, metrics files."""
import json
import os

import jax
import numpy as np
import pytest

from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train.init_from import restore_params
from fusion_jax.train import metrics as metrics_lib
from fusion_jax.train.loop import NonFiniteError, setup, train
from test_train_step import PoisonTask, host_batches, leaves, toy_config

MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
MESH_811 = {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1}


@pytest.fixture(scope="module")
def saved_222(tmp_path_factory):
  """A state after one step on the 2x2x2 mesh, saved; plus the next batch."""
  cfg = toy_config(**MESH_222)
  su = setup(cfg)
  b1, b2 = host_batches(cfg, 2)
  step = su.make_step(donate=False)
  state, _ = step(su.init_state(), su.global_batch(b1))
  directory = str(tmp_path_factory.mktemp("ckpt222"))
  ck = ckpt_lib.Checkpointer(directory, keep_last=2)
  ck.save(state, data_state={"position": 1}, config={"note": "2x2x2"})
  ck.close()
  return dict(su=su, step=step, state=state, next_batch=b2, directory=directory)


def test_restore_onto_different_mesh(saved_222):
  src = saved_222
  su = setup(toy_config(**MESH_811))
  ck = ckpt_lib.Checkpointer(src["directory"])
  assert ck.latest_step() == 1
  state, data_state = ck.restore(1, su.target)
  ck.close()
  assert data_state == {"position": 1}
  for x in jax.tree.leaves((state.params, state.opt_state)):
    assert dict(x.sharding.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  for a, b in zip(leaves(state), leaves(src["state"])):
    np.testing.assert_array_equal(a, b)
  # The restored state trains on: one more step agrees with the step on the original mesh.
  s_new, m_new = su.make_step(donate=False)(state, su.global_batch(src["next_batch"]))
  s_old, m_old = src["step"](src["state"], src["su"].global_batch(src["next_batch"]))
  np.testing.assert_allclose(m_new["loss"], m_old["loss"], rtol=1e-5)
  for a, b in zip(leaves(s_new.params), leaves(s_old.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_restore_params_partial(saved_222):
  """init_from keeps fresh values for parameters the checkpoint lacks (new modules)."""
  su = saved_222["su"]
  target = dict(su.target.params)
  target["new_module"] = jax.ShapeDtypeStruct((4,), np.float32,
                                              sharding=su.target.params["final_norm"]["scale"].sharding)
  fresh = dict(jax.device_get(su.init_state().params), new_module=np.full((4,), 7.0, np.float32))
  params, report = restore_params(saved_222["directory"], target, fresh_params=fresh)
  assert report["fresh"] == ["new_module"] and not report["unused"]
  np.testing.assert_array_equal(np.asarray(params["new_module"]), 7.0)
  np.testing.assert_array_equal(np.asarray(params["block_1"]["fc1"]["kernel"]),
                                np.asarray(saved_222["state"].params["block_1"]["fc1"]["kernel"]))
  with pytest.raises(ValueError, match="missing from the checkpoint"):
    restore_params(saved_222["directory"], target)


def test_train_init_from_and_outputs(saved_222, tmp_path, capsys):
  """A stage started with init_from: params from the source, fresh optimizer, all outputs."""
  cfg = toy_config(num_steps=3, log_every=1, init_from=saved_222["directory"],
                   trace_batch_key="sample_id", peak_tflops_per_device=1e-3, **MESH_222)
  out = train(cfg, str(tmp_path))
  n_params = len(jax.tree.leaves(saved_222["state"].params))
  assert out["init_from"] == {"restored": n_params, "fresh": 0, "unused": 0}
  assert out["resumed_from"] is None and out["step"] == 3 and out["checkpoint_step"] == 3
  printed = capsys.readouterr().out
  assert "step 1/3 | loss" in printed and "step 3/3" in printed and "ETA" in printed
  assert "MFU" in printed and "tok/s" in printed
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[-1]["data/samples"] == 3 * 8
  assert {"loss", "loss/ce", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu",
          "step_time_s", "eta_s"} <= set(records[-1])
  assert os.path.getsize(tmp_path / "loss_curve.png") > 1000
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  # The checkpoint's optimizer started fresh: its Adam count equals this run's 3 steps.
  ck = ckpt_lib.Checkpointer(out["checkpoint_dir"])
  su = setup(cfg)
  state, data_state = ck.restore(3, su.target)
  ck.close()
  counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if "count" in jax.tree_util.keystr(p)]
  assert counts and set(counts) == {3}
  assert data_state["counters"]["samples"] == 24
  with open(tmp_path / "checkpoints" / "3" / "config" / "metadata") as f:
    assert json.load(f)["init_from"] == saved_222["directory"]


class PoisonFromBatch:
  """Adds poison=True to every batch from the `start`-th on (1-based)."""

  def __init__(self, it, start):
    self.it, self.start, self.n = it, start, 0
    self.counters = it.counters

  def __next__(self):
    b = next(self.it)
    self.n += 1
    return dict(b, poison=np.full(b["sample_id"].shape, self.n >= self.start))

  def get_state(self):
    return {"inner": self.it.get_state(), "n": self.n}

  def set_state(self, state):
    self.it.set_state(state["inner"])
    self.n = state["n"]


class LatePoisonTask(PoisonTask):
  def make_data_iterator(self, process_index, process_count):
    return PoisonFromBatch(super().make_data_iterator(process_index, process_count), start=5)


def test_consecutive_nonfinite_aborts_naming_last_good_checkpoint(tmp_path):
  cfg = toy_config(num_steps=20, max_nonfinite=3, **{"checkpoint.every": 2}, **MESH_222)
  with pytest.raises(NonFiniteError) as e:
    train(cfg, str(tmp_path), task=LatePoisonTask(cfg))
  msg = str(e.value)
  assert "3 consecutive steps" in msg and "steps 5..7" in msg
  assert f"Last good checkpoint: {tmp_path}/checkpoints/4" in msg
  records = metrics_lib.read_metrics(str(tmp_path))
  assert records[0]["nonfinite_total"] == 0


def test_keep_last_plus_keep_every(tmp_path):
  import optax
  from fusion_jax.train.state import create_state
  state = create_state({"w": np.zeros((2,), np.float32)}, optax.sgd(0.1), jax.random.key(0))
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep_last=2, keep_every=4)
  for step in range(1, 10):
    ck.save(state, step=step, data_state={"i": step})
  ck.close()
  assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [4, 8, 9]
