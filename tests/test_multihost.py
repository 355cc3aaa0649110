"""Multi-host training on one machine: 2 processes x 4 CPU devices tied by jax.distributed on
127.0.0.1, against 1 process x 8 devices, both with the same config (tests/multihost_config.py:
the tiny FUSION; 24 good records + 2 skipped = 1 epoch of 3 steps at global batch 8).

  multi      2 processes, `python -m fusion_jax.train --multihost=true` (coordinator, process
             count and id from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID):
             3 steps, checkpoints 2 and 3
  reference  this pytest process on its 8 devices, the same 3 steps
  restore    2 processes of tests/multihost_restore.py: checkpoint 3 of `multi` restored in the
             2x4 topology (as the trainer's resume does), each process's shards written out

Checks: (a) every record of the epoch is read by exactly one process (each process logs the
labels of its rows, config.trace_batch_key); (b) parameters and optimizer state equal the
reference's within 1e-6, not bitwise: a 2-process global batch holds the same records as the
1-process one, but ordered host by host (host shards are strided), so the cross-device sums add
the same terms in another order; (c) the checkpoints of the two processes restore in 1x8 (here,
compared with the reference) and in 2x4 (every shard bitwise equal to the 1x8 restore, each
process gets its own data-iterator position); the data counters in metrics.jsonl (samples,
skips) are global, summed over the processes, and equal the 1-process run's.
"""
import json
import os
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from experiment_helpers import override
from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train import metrics as metrics_lib
from fusion_jax.train.loop import setup, train
from multihost_config import get_config
from pipeline_fixtures import batch_sample_ids, make_tokenizer, write_dataset
from test_train_resume import ROOT, _env
from xla_env import xla_flags

NUM_RECORDS, GLOBAL_BATCH, PROCESSES = 24, 8, 2
EPOCH_STEPS = NUM_RECORDS // GLOBAL_BATCH
TOL = 1e-6


def _overrides(data_dir: str) -> dict:
  """The config overrides of every run (the CLI's --config.KEY=VALUE, or override())."""
  return {"data.paths": os.path.join(data_dir, "data.json"), "data.image_root": data_dir,
          "data.tokenizer": os.path.join(data_dir, "tok"), "num_steps": EPOCH_STEPS,
          "global_batch": GLOBAL_BATCH, "checkpoint.every": 2, "trace_batch_key": "labels"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(*argv: str) -> list[subprocess.Popen]:
  """Starts `python argv...` as PROCESSES processes of 4 CPU devices each."""
  port = _free_port()
  cmd = [sys.executable, *argv]
  procs = []
  for i in range(PROCESSES):
    env = _env()
    env.update(XLA_FLAGS=xla_flags(4),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(i),
               # Only process 0 may use jax's persistent cache (the others' cache keys differ
               # and they never write), and CPU collectives (gloo) give a process 30 s to
               # join: a cache hit on process 0 alone could leave the other behind. Both
               # compile, in step.
               JAX_ENABLE_COMPILATION_CACHE="false")
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> None:
  """Waits for the processes of `_start`; fails with their logs."""
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired as e:
    out = e.output.decode() if isinstance(e.output, bytes) else (e.output or "")
    raise AssertionError(f"process {len(logs)} still running after {timeout} s:\n"
                         f"{out[-4000:]}") from None
  finally:
    for p in procs:  # one process failing leaves the other waiting in a collective
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-4000:]}"
    assert f"process {i} of {PROCESSES}" in log, log[-2000:]


def _start_training(workdir: str, data_dir: str) -> list[subprocess.Popen]:
  args = [f"--config.{k}={v}" for k, v in _overrides(data_dir).items()]
  return _start("-m", "fusion_jax.train", "--multihost=true", "--config",
                os.path.join(ROOT, "tests", "multihost_config.py"), "--workdir", workdir, *args)


def _records_read(workdir: str, process: int, tok) -> dict[int, list[int]]:
  """{step: record indices} that `process` read, from its trace of the label rows."""
  out = {}
  with open(os.path.join(workdir, "trace", f"process_{process}.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      labels = np.asarray(rec["ids"])
      out[rec["step"]] = batch_sample_ids(
          {"input_ids": labels, "labels": labels, "token_mask": labels != -100}, tok)
  return out


def _state_leaves(workdir: str, step: int, su) -> dict[str, np.ndarray]:
  """{path: array} of the params, optimizer state and counters of checkpoint `step`, restored
  onto `su`'s mesh."""
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir))
  state, _ = ck.restore(step, su.target, restore_data=False)
  ck.close()
  tree = jax.device_get((state.params, state.opt_state, state.counters()))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """NUM_RECORDS good records ('answer i', every other with an image) plus 2 that the pipeline
  skips (no answer), placed first in the shuffled order: one in each process's strided shard,
  so both topologies skip them and then batch the same records."""
  root = str(tmp_path_factory.mktemp("multihost_data"))
  make_tokenizer(root)
  path = write_dataset(root, NUM_RECORDS)
  with open(path) as f:
    recs = json.load(f)
  order = list(grain.MapDataset.range(NUM_RECORDS + 2).shuffle(seed=get_config().data.seed))
  for pos in sorted(order[:2]):
    recs.insert(pos, {"id": "unanswered", "conversations": [
        {"from": "human", "value": "a question nobody answers?"}]})
  with open(path, "w") as f:
    json.dump(recs, f)
  return root


def test_two_processes_match_one_process(data_dir, tmp_path):
  multi, ref, restored = (str(tmp_path / d) for d in ("multi", "ref", "restored"))
  procs = _start_training(multi, data_dir)
  try:  # the reference runs while the two processes start up
    cfg = override(get_config(), **_overrides(data_dir))
    out = train(cfg, ref)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  _wait(procs)
  assert out["step"] == EPOCH_STEPS and jax.process_count() == 1 and jax.device_count() == 8
  assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(multi)).all_steps() == [2, EPOCH_STEPS]
  _wait(_start(os.path.join(ROOT, "tests", "multihost_restore.py"), multi, str(EPOCH_STEPS),
               restored, json.dumps(_overrides(data_dir))))

  # (a) The epoch's records, each read by exactly one process, half of each step per process.
  tok = make_tokenizer(data_dir)
  read = [_records_read(multi, p, tok) for p in range(PROCESSES)]
  for r in read:
    assert sorted(r) == list(range(1, EPOCH_STEPS + 1))
    assert all(len(ids) == GLOBAL_BATCH // PROCESSES for ids in r.values())
  ids = [i for r in read for step_ids in r.values() for i in step_ids]
  assert sorted(ids) == list(range(NUM_RECORDS))
  # Each step's global batch holds the same records as the 1-process run's.
  ref_read = _records_read(ref, 0, tok)
  for step in range(1, EPOCH_STEPS + 1):
    assert sorted(read[0][step] + read[1][step]) == sorted(ref_read[step]), step

  # Counters are global: process 0's metrics count the samples and skips of both processes.
  records = metrics_lib.read_metrics(multi)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert [r["data/samples"] for r in records] == [8, 16, 24]
  skips = [sum(v for k, v in r.items() if k.startswith("data/") and k != "data/samples")
           for r in records]
  assert skips == [2, 2, 2], skips  # one unanswered record in each process's shard
  ref_records = metrics_lib.read_metrics(ref)
  for r, q in zip(records, ref_records):
    assert {k: v for k, v in r.items() if k.startswith("data/")} == {
        k: v for k, v in q.items() if k.startswith("data/")}
    np.testing.assert_allclose(r["loss"], q["loss"], rtol=TOL)

  # (b) + (c, 1x8): the two processes' checkpoints restore on the 1x8 mesh and match the
  # 1-process run's within TOL.
  su = setup(cfg)
  for step in (2, EPOCH_STEPS):
    got, want = _state_leaves(multi, step, su), _state_leaves(ref, step, su)
    assert got.keys() == want.keys()
    diff = {k: float(np.max(np.abs(got[k] - want[k]), initial=0.0)) for k in got}
    worst = max(diff, key=diff.get)
    print(f"checkpoint {step}: max |2x4 - 1x8| = {diff[worst]:.3g} ({worst}); "
          f"bitwise equal leaves: {sum(v == 0 for v in diff.values())}/{len(diff)}")
    assert diff[worst] <= TOL, f"checkpoint {step}: max |2x4 - 1x8| = {diff[worst]:.3g} at {worst}"

  # (c, 2x4): the same checkpoint restored by the two processes: every shard of every leaf,
  # bitwise the 1x8 restore; each process resumes its own data position.
  full = got
  covered = {k: 0 for k in full}
  for p in range(PROCESSES):
    with np.load(os.path.join(restored, f"process_{p}.npz")) as shards:
      for key in shards.files:
        path, index = key.rsplit("@", 1)
        sl = tuple(slice(*(int(x) if x else None for x in part.split(":")))
                   for part in index.split(",") if part)
        np.testing.assert_array_equal(shards[key], full[path][sl], err_msg=key)
        covered[path] += shards[key].size
    with open(os.path.join(restored, f"process_{p}_data.json")) as f:
      data_state = json.load(f)
    saved = os.path.join(ckpt_lib.checkpoint_dir(multi), str(EPOCH_STEPS), "data",
                         f"process_{p}-of-{PROCESSES}.json")
    with open(saved) as f:
      assert data_state == json.load(f)
    assert data_state["counters"]["samples"] == NUM_RECORDS // PROCESSES
  # Every element is restored on some process (replicated leaves on several).
  assert all(covered[k] >= full[k].size for k in full), [k for k in full if covered[k] < full[k].size]
