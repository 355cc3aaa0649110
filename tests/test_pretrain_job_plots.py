"""The main job's charts (fusion_jax/job_plots.py) and per-category targets (run.target_of)."""
import json
import os

from fusion_jax import job_plots
from fusion_jax import run as run_lib


def _metrics(d, losses):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for i, x in enumerate(losses):
      f.write(json.dumps({"step": i + 1, "loss": x, "loss/ce": x / 2}) + "\n")


def test_job_loss_curve_spans_both_stages(tmp_path, monkeypatch):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _metrics(a, [3.0, 2.0, 1.0])
  _metrics(b, [1.5, 0.5])
  marks = []
  import matplotlib.axes
  orig = matplotlib.axes.Axes.axvline
  monkeypatch.setattr(matplotlib.axes.Axes, "axvline",
                      lambda self, x, *k, **kw: (marks.append(x), orig(self, x, *k, **kw))[1])
  out = job_plots.plot_job_loss([("alignment", a), ("instruction", b)], str(tmp_path / "j.png"))
  assert os.path.getsize(out) > 0
  assert marks == [3]  # the boundary after the first stage's 3 steps
  assert job_plots.plot_job_loss([("x", str(tmp_path / "none"))], str(tmp_path / "n.png")) is None


def test_targets_chart_and_target_of(tmp_path):
  assert run_lib.target_of("SynthColor", 0.125) == 0.9
  assert run_lib.target_of("SynthCount", 1 / 6) == 2 / 6
  report = {"SynthColor": {"accuracy": 1.0, "chance": 0.125},
            "SynthCount": {"accuracy": 0.2, "chance": 1 / 6}, "all": {"accuracy": 0.6, "chance": 0.1}}
  out = job_plots.plot_targets(report, {c: run_lib.target_of(c, r["chance"])
                                        for c, r in report.items()}, str(tmp_path / "t.png"))
  assert os.path.getsize(out) > 0
