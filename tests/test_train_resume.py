"""Exact resume through the CLI: SIGKILL mid-run and SIGTERM (preemption), as subprocesses.

Each run is `python -m fusion_jax.train --config experiments/toy.py ...` on 8 virtual CPU
devices (mesh 2x2x2), 10 steps. The straight run is the reference: a run killed after its
step-5 checkpoint and resumed must end with bitwise-equal parameters and must have trained on
the same samples in the same order (logged per step via config.trace_batch_key).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train.loop import setup
from test_train_step import leaves, toy_config
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10
ARGS = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        f"--config.num_steps={NUM_STEPS}", "--config.global_batch=8", "--config.log_every=1",
        "--config.trace_batch_key=sample_id", "--config.checkpoint.keep_last=5"]


def _env():
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8),
      JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
      JAX_COMPILATION_CACHE_DIR=os.environ.get(
          "FUSION_JAX_TEST_CACHE", os.path.join(ROOT, ".cache", "jax")),
      PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "fusion_jax.train", "--config", os.path.join(ROOT, "experiments", "toy.py"),
          "--workdir", str(workdir), *ARGS, *extra]


def run(workdir, *extra, timeout=120):
  p = subprocess.run(_cmd(workdir, *extra), env=_env(), cwd=ROOT, capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def start(workdir, *extra):
  return subprocess.Popen(_cmd(workdir, *extra), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=90):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.05)


def trace(workdir):
  """{step: sample ids}; a resumed run redoes steps after its checkpoint: they must agree."""
  seen = {}
  path = os.path.join(workdir, "trace", "process_0.jsonl")
  if not os.path.exists(path):
    return seen
  with open(path) as f:
    for line in f:
      if not line.endswith("\n"):  # being written by a running process
        break
      rec = json.loads(line)
      if rec["step"] in seen:
        assert seen[rec["step"]] == rec["ids"], f"step {rec['step']} saw different samples"
      seen[rec["step"]] = rec["ids"]
  return seen


def final_params(workdir):
  su = setup(toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(workdir)))
  assert ck.latest_step() == NUM_STEPS
  state, data_state = ck.restore(NUM_STEPS, su.target)
  ck.close()
  return leaves((state.params, state.opt_state, state.counters())), data_state


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  p = run(workdir, "--config.checkpoint.every=5")
  assert f"step {NUM_STEPS}/{NUM_STEPS}" in p.stdout
  params, data_state = final_params(workdir)
  return dict(params=params, data_state=data_state, trace=trace(workdir))


def assert_same_run(workdir, ref):
  params, data_state = final_params(workdir)
  assert len(params) == len(ref["params"])
  for a, b in zip(params, ref["params"]):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU
  assert data_state == ref["data_state"]
  assert trace(workdir) == ref["trace"]
  assert sorted(ref["trace"]) == list(range(1, NUM_STEPS + 1))


def test_sigkill_then_resume_is_bitwise_identical(straight, tmp_path):
  # A slow input pipeline (0.3 s per batch) leaves time to kill the run after its step-5
  # checkpoint is complete and before it ends.
  proc = start(tmp_path, "--config.checkpoint.every=5", "--config.data.delay_s=0.3")
  # Kill once checkpoint 5 is complete AND step 6 has run: the resumed run must redo it.
  wait_for(lambda: os.path.isdir(tmp_path / "checkpoints" / "5") and
           6 in trace(tmp_path), proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  done = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(tmp_path))).all_steps()
  assert done == [5], done  # killed mid-run: no final checkpoint
  p = run(tmp_path, "--config.checkpoint.every=5")
  assert f"resumed from {tmp_path}/checkpoints/5" in p.stderr
  assert_same_run(tmp_path, straight)


def test_sigterm_saves_exits_zero_and_resumes(straight, tmp_path):
  proc = start(tmp_path, "--config.checkpoint.every=0", "--config.data.delay_s=0.3")
  wait_for(lambda: os.path.exists(tmp_path / "metrics.jsonl") and
           sum(1 for _ in open(tmp_path / "metrics.jsonl")) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-3000:]
  steps = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(tmp_path))).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < NUM_STEPS, steps
  assert f"preempted at step {steps[0]}" in err
  p = run(tmp_path, "--config.checkpoint.every=0")
  assert f"resumed from {tmp_path}/checkpoints/{steps[0]}" in p.stderr
  assert_same_run(tmp_path, straight)
