"""Metrics files through etils.epath (a gs:// workdir, faked locally); final counters agree
between metrics.jsonl, the training summary and the checkpoint when the data runs dry."""
from __future__ import annotations

import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train import metrics as metrics_lib
from fusion_jax.train.loop import train
from experiments.toy import ToyTask
from test_train_step import toy_config


def _write_run(workdir: str, steps: int = 3) -> None:
  w = metrics_lib.MetricsWriter(workdir, num_steps=steps, start_step=0)
  for s in range(1, steps + 1):
    w.write(s, {"loss": 3.0 / s, "loss/ce": 3.0 / s, "lr": 1e-3}, {"samples": 8 * s})
  w.close()


def test_local_workdir(tmp_path):
  _write_run(str(tmp_path))
  _write_run(str(tmp_path), steps=2)  # a restart appends; later records of a step win
  recs = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in recs] == [1, 2, 3] and recs[1]["data/samples"] == 16
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  out = metrics_lib.plot_loss_curve(str(tmp_path))
  assert out == str(tmp_path / "loss_curve.png") and os.path.getsize(out) > 1000


@pytest.fixture()
def fake_gcs(tmp_path, monkeypatch):
  """epath with gs://bucket/... stored under tmp_path/gcs/bucket/...; plain file APIs on a
  gs:// path would create a 'gs:' folder in the working directory (checked after the test)."""
  root = tmp_path / "gcs"

  def local(path):
    p = os.fspath(path)
    return str(root / p[len("gs://"):]) if p.startswith("gs://") else p

  def one(orig, path, *args, **kw):
    return orig(local(path), *args, **kw)

  def two(orig, src, dst, *args, **kw):
    return orig(local(src), local(dst), *args, **kw)

  def glob(orig, pattern):
    return [("gs://" + os.path.relpath(p, root)) if p.startswith(str(root)) else p
            for p in orig(local(pattern))]

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
                                mkdir=one, remove=one, rmtree=one, stat=one, walk=one,
                                glob=glob, rename=two, replace=two, copy=two):
    yield root
  assert os.listdir(cwd) == []


def test_gs_workdir_goes_through_epath(fake_gcs):
  workdir = "gs://bucket/run"
  _write_run(workdir)
  run = fake_gcs / "bucket" / "run"
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3]
  events = [f for f in os.listdir(run / "tb") if f.startswith("events.out.tfevents")]
  assert events and os.path.getsize(run / "tb" / events[0]) > 100
  assert metrics_lib.plot_loss_curve(workdir) == f"{workdir}/loss_curve.png"
  assert (run / "loss_curve.png").stat().st_size > 1000
  # A remote file is rewritten whole (no append on object stores); a reopen keeps the records.
  f = metrics_lib.AppendFile(epath.Path(workdir) / "metrics.jsonl", upload_every_s=1e9)
  f.write('{"step": 4, "loss": 0.5}\n')  # the first write uploads at once
  f.write('{"step": 5, "loss": 0.4}\n')
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # throttled
  f.close()
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3, 4, 5]


class TrailingSkips:
  """The toy iterator limited to `n` batches; when it runs dry it finds `k` more skipped records
  (as the data pipeline does for records after the last good one), counted as bad_json."""

  def __init__(self, it, n: int, k: int):
    self.it, self.n, self.k, self.i = it, n, k, 0
    self.counters = {"samples": 0, "bad_json": 0}

  def __next__(self):
    if self.i >= self.n:
      if self.k:
        self.counters["bad_json"] += self.k
        self.k = 0
      raise StopIteration
    self.i += 1
    b = next(self.it)
    self.counters["samples"] += int(b["sample_id"].shape[0])
    self.counters["bad_json"] += 1
    return b

  def get_state(self):
    return {"inner": self.it.get_state(), "i": self.i, "k": self.k,
            "counters": dict(self.counters)}

  def set_state(self, state):
    self.it.set_state(state["inner"])
    self.i, self.k, self.counters = state["i"], state["k"], dict(state["counters"])


class DryTask(ToyTask):
  def make_data_iterator(self, process_index, process_count):
    return TrailingSkips(super().make_data_iterator(process_index, process_count), n=3, k=2)


@pytest.mark.parametrize("every", [2, 3])  # 3: the last step's checkpoint is re-saved
def test_final_counters_agree_when_data_runs_dry(tmp_path, every):
  cfg = toy_config(num_steps=6, log_every=100, **{"checkpoint.every": every},
                   **{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
  out = train(cfg, str(tmp_path), task=DryTask(cfg))
  assert out["step"] == 3 and out["checkpoint_step"] == 3
  want = {"samples": 24, "bad_json": 3 + 2}
  last = metrics_lib.read_metrics(str(tmp_path))[-1]
  assert last["step"] == 3  # written although 3 is not a log_every step
  assert {k[5:]: v for k, v in last.items() if k.startswith("data/")} == want
  assert {k[5:]: v for k, v in out["last"].items() if k.startswith("data/")} == want
  data = ckpt_lib.DataStateHandler().restore(
      epath.Path(out["checkpoint_dir"]) / "3" / "data")
  assert data["counters"] == want
