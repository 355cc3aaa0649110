"""Damaged checkpoints: resume walks back to the newest step that restores completely."""
import glob
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.infer import workdir as workdir_lib
from fusion_jax.train.loop import setup, train
from fusion_jax.train.state import create_state
from test_train_step import leaves, toy_config

MESH = {"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1}


def _largest_params_file(step_dir):
  """The largest array data file of the params item (params/d/<hash> after orbax merges the
  per-process OCDBT trees; ocdbt.process_*/d/ then holds unreferenced leftovers)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "params", "d", "*")) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def truncate_half(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def overwrite_random(path):
  n = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(n))


def test_damaged_newest_steps_resume_from_older_one(tmp_path):
  """Steps 2 (random bytes) and 3 (truncated) damaged, 1 intact: the rerun resumes from 1,
  moves 2 and 3 aside (kept) and ends bitwise equal to the undamaged run."""
  cfg = toy_config(num_steps=3, **{"checkpoint.every": 1, "checkpoint.keep_last": 5}, **MESH)
  first = train(cfg, str(tmp_path))
  assert first["checkpoint_step"] == 3
  ckdir = first["checkpoint_dir"]
  ref_dir = str(tmp_path / "reference")
  shutil.copytree(os.path.join(ckdir, "3"), os.path.join(ref_dir, "3"))  # read after the rerun
  overwrite_random(_largest_params_file(os.path.join(ckdir, "2")))
  truncate_half(_largest_params_file(os.path.join(ckdir, "3")))

  second = train(cfg, str(tmp_path))
  assert second["resumed_from"] == 1 and second["checkpoint_step"] == 3
  assert sorted(os.listdir(ckdir + ckpt_lib.DAMAGED_SUFFIX)) == ["2", "3"]
  # Readers of the run (eval, export) see the intact steps only.
  assert workdir_lib.checkpoint_steps(str(tmp_path)) == [1, 2, 3]
  assert workdir_lib.run_config(str(tmp_path)).num_steps == 3
  su = setup(cfg)
  restored = []
  for directory in (ckdir, ref_dir):
    ck = ckpt_lib.Checkpointer(directory)
    state, data = ck.restore(3, su.target)
    ck.close()
    restored.append((leaves((state.params, state.opt_state, state.counters())), data))
  (new, new_data), (ref, ref_data) = restored
  for a, b in zip(new, ref):
    np.testing.assert_array_equal(a, b)
  assert new_data == ref_data


@pytest.fixture()
def two_steps(tmp_path):
  """A tiny state saved at steps 1 and 2; returns (directory, abstract target)."""
  state = create_state({"w": jax.numpy.arange(64, dtype=np.float32).reshape(8, 8)},
                       optax.adam(1e-3), jax.random.key(0))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep_last=5, async_save=False)
  for step in (1, 2):
    ck.save(state, step=step, data_state={"step": step}, config={"c": 1})
  ck.close()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  return str(tmp_path / "ck"), target


def test_deleted_data_state_is_damage_not_mismatch(two_steps):
  directory, target = two_steps
  os.remove(os.path.join(directory, "2", "data", "process_0-of-1.json"))
  ck = ckpt_lib.Checkpointer(directory)
  step, _, data = ck.restore_latest(target)
  ck.close()
  assert (step, data) == (1, {"step": 1})
  assert os.path.isdir(os.path.join(directory + ckpt_lib.DAMAGED_SUFFIX, "2", "params"))


def test_every_step_damaged_is_one_clear_error(two_steps):
  directory, target = two_steps
  os.remove(os.path.join(directory, "2", "data", "process_0-of-1.json"))
  with open(os.path.join(directory, "1", "config", "metadata"), "w") as f:
    f.write("{not json")
  ck = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.NoRestorableCheckpointError) as e:
    ck.restore_latest(target)
  ck.close()
  msg = str(e.value)
  assert "step 2: data state file process_0-of-1.json is missing" in msg
  assert "step 1: config item unreadable" in msg
  assert "does not match" not in msg and "init_from" in msg
  assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved when nothing restores


def test_other_model_is_a_mismatch_not_damage(two_steps):
  directory, target = two_steps
  other = target.replace(params={"w": jax.ShapeDtypeStruct((8, 4), np.float32)})
  ck = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"parameter w: checkpoint \(8, 8\)"):
    ck.restore_latest(other)
  ck.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]
