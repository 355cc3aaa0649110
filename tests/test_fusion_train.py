"""FusionTask through the real trainer (experiments/fusion_tiny.py on a tiny on-disk dataset):
sharded step == single-device step, train() writes checkpoints / metrics, a frozen vision tower
stays bitwise unchanged, init_from a model dir (the stage-1 start)."""
import math
import os

import jax
import numpy as np
import pytest

from fusion_jax.convert.model_dir import save_model_dir
from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train.init_from import restore_params
from fusion_jax.train import metrics as metrics_lib
from fusion_jax.task.fusion import FusionTask
from experiment_helpers import load_experiment, override
from fusion_jax.train.loop import setup, train
from pipeline_fixtures import make_tokenizer, write_dataset

MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
ONE_DEVICE = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """24 LLaVA records (every other with a PNG) and a ~300-token Phi-3-style tokenizer."""
  root = str(tmp_path_factory.mktemp("fusion_data"))
  make_tokenizer(root)
  write_dataset(root, 24)
  return root


def tiny_config(data_dir, **overrides):
  """experiments/fusion_tiny.py pointed at the fixture data, with dotted-key overrides."""
  c = load_experiment("fusion_tiny")
  c.data.paths = os.path.join(data_dir, "data.json")
  c.data.image_root = data_dir
  c.data.tokenizer = os.path.join(data_dir, "tok")
  # Adam's first update is ~lr * sign(g): a larger eps keeps the sharded-vs-single comparison
  # about the gradients, not about the sign of near-zero entries' rounding.
  c.optim.eps = 1e-4
  return override(c, **overrides)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_sharded_step_equals_single_device(data_dir):
  cfg8 = tiny_config(data_dir, **MESH_222)
  cfg1 = tiny_config(data_dir, **ONE_DEVICE)
  su8 = setup(cfg8)
  su1 = setup(cfg1, devices=jax.devices()[:1])
  assert dict(su8.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  # The vocabulary really is split over the tensor axis and the width over fsdp.
  assert su8.shardings.params["llm"]["embed_tokens"]["embedding"].spec == jax.P("tensor", "fsdp")
  it = su8.task.make_data_iterator(0, 1)
  batch = next(it)
  it.close()
  assert batch["has_image"].any() and not batch["has_image"].all()
  state8 = su8.init_state()
  # The same initial state on one device (one init compilation instead of two).
  state1 = jax.device_put(jax.device_get(state8), su1.shardings)
  s8, m8 = su8.make_step()(state8, su8.global_batch(batch))
  s1, m1 = su1.make_step()(state1, su1.global_batch(batch))
  m8, m1 = jax.device_get(m8), jax.device_get(m1)
  assert np.isfinite(m8["loss"]) and m8["skipped"] == 0
  for key in ("loss", "loss/ce", "loss/text_map", "loss/vision_map", "grad_norm"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-5, err_msg=key)
  # docs/model.md §8: loss = ce + 0.1 * (text_map + vision_map), each over the global batch.
  np.testing.assert_allclose(
      m8["loss"], m8["loss/ce"] + 0.1 * (m8["loss/text_map"] + m8["loss/vision_map"]), rtol=1e-6)
  assert m8["denominator/vision_map"] == 8 * 16  # faithful: all B x N patches
  for a, b in zip(leaves(s8.params), leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_train_frozen_tower_checkpoint_metrics_and_model_dir_init(data_dir, tmp_path):
  """train() with a frozen vision tower: checkpoints, metrics, finite loss; the tower is
  bitwise the init; its params restore through init_from from a model dir."""
  # q = 1 for every batch (the first batch of the sharded test has q = 1 too): one compilation.
  cfg = tiny_config(data_dir, num_steps=3, **MESH_222,
                    **{"optim.rules": (("^vision_tower/", "freeze"),), "checkpoint.every": 2,
                       "model.overrides.query_len": (1,)})
  workdir = str(tmp_path / "run")
  out = train(cfg, workdir)
  assert out["step"] == 3 and out["checkpoint_step"] == 3 and not out["preempted"]
  assert sorted(ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir)).all_steps()) == [2, 3]
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert math.isfinite(r["loss"]) and r["skipped"] == 0 and r["tokens"] > 0
    assert {"loss/ce", "loss/text_map", "loss/vision_map"} <= set(r)
  assert out["last"]["data/samples"] == 24  # 3 batches of 8, nothing skipped
  assert os.path.isfile(out["loss_curve"])

  su = setup(cfg)
  init = jax.device_get(su.init_state().params)
  trained, report = restore_params(workdir, su.target.params)
  assert not report["fresh"] and not report["unused"]
  trained = jax.device_get(trained)
  for a, b in zip(leaves(trained["vision_tower"]), leaves(init["vision_tower"])):
    np.testing.assert_array_equal(a, b)
  for name in ("llm", "mm_projector", "aux_projector", "interaction_0"):
    moved = [not np.array_equal(a, b) for a, b in zip(leaves(trained[name]), leaves(init[name]))]
    assert all(moved), name

  # The stage-1 start: a model dir (what convert.import_hf writes) works as init_from.
  model_dir = str(tmp_path / "model_dir")
  save_model_dir(model_dir, trained, FusionTask(cfg).cfg)
  again, report = restore_params(model_dir, su.target.params)
  assert len(report["restored"]) == len(jax.tree.leaves(trained)) and not report["fresh"]
  for a, b in zip(leaves(again), leaves(trained)):
    np.testing.assert_array_equal(a, b)


class _FirstBatchBroken:
  """A data iterator whose first batch breaks the batch contract (a padding token marked real)."""

  def __init__(self, it):
    self.it, self.first = it, True

  def __next__(self):
    batch = dict(next(self.it))
    if self.first:
      self.first = False
      mask = batch["token_mask"].copy()
      mask[0, -1] = True
      batch["token_mask"] = mask
    return batch

  def __getattr__(self, name):  # get_state, set_state, counters, close
    return getattr(self.it, name)


def test_first_batch_is_checked_against_the_contract(data_dir, tmp_path, monkeypatch):
  """train() stops on the first host batch, in one line naming the key, before any step."""
  make = FusionTask.make_data_iterator
  monkeypatch.setattr(FusionTask, "make_data_iterator",
                      lambda self, *a: _FirstBatchBroken(make(self, *a)))
  cfg = tiny_config(data_dir)
  with pytest.raises(ValueError, match="first batch: token_mask differs from segment_ids > 0"):
    train(cfg, str(tmp_path / "run"))
  assert not ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(tmp_path / "run"))).all_steps()


def test_check_batch_names_a_size_the_config_disagrees_with(data_dir):
  task = FusionTask(tiny_config(data_dir))
  it = task.make_data_iterator(0, 1)
  batch = next(it)
  it.close()
  task.check_batch(batch)  # the pipeline's own batch passes
  short = FusionTask(tiny_config(data_dir, **{"data.seq_len": task.data_config(1).seq_len // 2}))
  with pytest.raises(ValueError, match=r"first batch: seq_len is \d+, the config's \d+"):
    short.check_batch(batch)
