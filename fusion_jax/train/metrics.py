"""Training metrics: console progress line, TensorBoard events, JSONL log, loss-curve PNG.

Only process 0 writes. Files in the workdir:
  metrics.jsonl      one JSON object per logged step (appended across restarts)
  tb/                TensorBoard event files (tensorboardX)
  loss_curve.png     total loss and its parts vs step, written at the end of `train()`

Every file goes through etils.epath, so a gs:// (or any epath-supported) workdir gets them
like a local one. Object stores cannot append: for a remote workdir metrics.jsonl and the
event file are kept in memory and rewritten whole, at most every `REMOTE_UPLOAD_S` seconds
and at close (a local workdir appends and flushes every record).
"""
from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"
REMOTE_UPLOAD_S = 30.0


def is_remote(path: str | epath.Path) -> bool:
  """True for URLs such as gs://bucket/run (no local append, no os.* calls)."""
  return "://" in str(path)


class AppendFile:
  """A text file that grows by appends, through epath.

  Local: opened in append mode, flushed after every write. Remote (gs://...): the whole text is
  kept and rewritten at most every `upload_every_s` seconds and at `close()`.
  """

  def __init__(self, path: str | epath.Path, upload_every_s: float = REMOTE_UPLOAD_S):
    self.path = epath.Path(path)
    self._remote = is_remote(path)
    self._every = upload_every_s
    self._last_upload = -math.inf
    self._dirty = False
    if self._remote:
      self._text = self.path.read_text() if self.path.exists() else ""
      self._f = None
    else:
      self._f = self.path.open("a")

  def write(self, text: str) -> None:
    if self._f is not None:
      self._f.write(text)
      self._f.flush()
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._last_upload >= self._every:
      self.upload()

  def upload(self) -> None:
    if self._remote and self._dirty:
      self.path.write_text(self._text)
      self._dirty, self._last_upload = False, time.monotonic()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    self.upload()


class _EpathRecordWriter:
  """tensorboardX record writer for remote paths: the event file is buffered and rewritten
  through epath (tensorboardX's own gs:// writer needs google-cloud-storage)."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buf = io.BytesIO()
    self._last_upload = -math.inf

  def write(self, data: bytes) -> None:
    self._buf.write(data)

  def flush(self, force: bool = False) -> None:
    if force or time.monotonic() - self._last_upload >= REMOTE_UPLOAD_S:
      self._path.write_bytes(self._buf.getvalue())
      self._last_upload = time.monotonic()

  def close(self) -> None:
    self.flush(force=True)


class _EpathWriterFactory:

  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def format_duration(seconds: float) -> str:
  """12345 -> '3:25:45'; '?' when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return (f"{d}d " if d else "") + f"{h}:{m:02d}:{s:02d}"


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class MetricsWriter:
  """Formats and records per-step metrics.

  Args:
    workdir: output directory.
    num_steps: total steps of the run (for ETA).
    start_step: first step of this process's run (resume point).
    enabled: False on processes other than 0 (nothing is written).
    flops_per_token: training FLOPs per token, None = no MFU.
    peak_flops: summed peak FLOP/s of all devices, None = no MFU.
  """

  def __init__(self, workdir: str, *, num_steps: int, start_step: int, enabled: bool = True,
               flops_per_token: float | None = None, peak_flops: float | None = None):
    self.workdir = workdir
    self.num_steps = num_steps
    self.enabled = enabled
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self._last_step = start_step
    self._last_time: float | None = None
    self._step_time_ema: float | None = None
    self._tb = None
    self._jsonl = None
    if enabled:
      root = epath.Path(workdir)
      root.mkdir(parents=True, exist_ok=True)
      self._jsonl = AppendFile(root / METRICS_FILE)
      try:
        from tensorboardX import SummaryWriter
        if is_remote(workdir):
          from tensorboardX import record_writer
          record_writer.register_writer_factory(str(workdir).split("://")[0],
                                                _EpathWriterFactory())
        self._tb = SummaryWriter(str(root / "tb"))
      except ImportError:  # TensorBoard is optional; JSONL and console stay
        logging.warning("tensorboardX not installed: no TensorBoard events")

  def start_clock(self, step: int) -> None:
    """Marks the time at which `step` steps were done (excludes compilation from timings)."""
    self._last_step, self._last_time = step, time.perf_counter()

  def write(self, step: int, metrics: Mapping[str, float],
            data_counters: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Records metrics of the state after `step` steps; returns the record written."""
    now = time.perf_counter()
    record: dict[str, Any] = {"step": step}
    record.update({k: float(v) for k, v in metrics.items()})
    if self._last_time is not None and step > self._last_step:
      dt = (now - self._last_time) / (step - self._last_step)
      record["step_time_s"] = dt
      self._step_time_ema = dt if self._step_time_ema is None else (
          0.9 * self._step_time_ema + 0.1 * dt)
      tokens = metrics.get("tokens")
      if tokens is not None and dt > 0:
        record["tokens_per_s"] = float(tokens) / dt
        if self.flops_per_token and self.peak_flops:
          record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops
    self._last_step, self._last_time = step, now
    if self._step_time_ema is not None:
      record["eta_s"] = self._step_time_ema * max(self.num_steps - step, 0)
    for k, v in (data_counters or {}).items():
      record[f"data/{k}"] = int(v)
    if self.enabled:
      print(self.progress_line(record), flush=True)
      self._jsonl.write(json.dumps(record) + "\n")
      if self._tb is not None:
        for k, v in record.items():
          if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
    return record

  def progress_line(self, r: Mapping[str, Any]) -> str:
    """'step 120/1000 | loss 2.3456 (ce 2.3012) | lr 1.9e-05 | gnorm 0.812 | ...'."""
    parts = [f"step {r['step']}/{self.num_steps}"]
    loss = f"loss {r.get('loss', float('nan')):.4f}"
    sub = [f"{k[5:]} {v:.4f}" for k, v in r.items() if k.startswith("loss/")]
    if len(sub) > 1 or (sub and not sub[0].startswith("ce ")):
      loss += " (" + ", ".join(sub) + ")"
    parts.append(loss)
    if "lr" in r:
      parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
      parts.append(f"gnorm {r['grad_norm']:.3f}")
    if "tokens_per_s" in r:
      parts.append(f"{_si(r['tokens_per_s'])} tok/s")
    if "step_time_s" in r:
      parts.append(f"{r['step_time_s']:.3f} s/step")
    if "mfu" in r:
      parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "eta_s" in r:
      parts.append(f"ETA {format_duration(r['eta_s'])}")
    if r.get("nonfinite_total"):
      parts.append(f"non-finite skipped {int(r['nonfinite_total'])}")
    skips = {k[5:]: v for k, v in r.items() if k.startswith("data/") and k != "data/samples" and v}
    if skips:
      parts.append("data skips " + " ".join(f"{k}={v}" for k, v in sorted(skips.items())))
    return " | ".join(parts)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Records of metrics.jsonl; for steps logged twice (a resumed run redoes steps after its
  last checkpoint) the later record wins."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  by_step: dict[int, dict[str, Any]] = {}
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      rec = json.loads(line)
      by_step[int(rec["step"])] = rec
  return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(workdir: str, out: str | None = None) -> str | None:
  """Writes the loss (and loss parts) vs step PNG; returns its path (None if no records)."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss/")})
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
  for k in keys:
    pts = [(r["step"], r[k]) for r in records if k in r and math.isfinite(r[k])]
    if pts:
      ax.plot(*zip(*pts), label=k, linewidth=1.5 if k == "loss" else 1.0)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(epath.Path(workdir).name if is_remote(workdir) else
               epath.Path(workdir).resolve().name)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  out = out or str(epath.Path(workdir) / CURVE_FILE)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  epath.Path(out).write_bytes(buf.getvalue())
  return out
