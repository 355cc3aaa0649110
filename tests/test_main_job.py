"""The main job end to end on a shortened smoke config: synthesize -> train -> checkpoint ->
resume -> eval -> export, and the export imports back to identical parameters."""
import json
import os

import jax
import numpy as np

from experiments import smoke
from fusion_jax import run as run_lib
from fusion_jax.convert.import_torch import import_torch
from fusion_jax.convert.model_dir import load_model_dir
from fusion_jax.train.workdir import load_run


def test_short_main_job_resumes_evaluates_and_exports(tmp_path):
  config = smoke.get_config("short")
  config.synth.cache_dir = str(tmp_path / "cache")
  config.num_steps = 4
  config.checkpoint.every = 2
  workdir = str(tmp_path / "run")

  first = run_lib.run(config, workdir, export=False)
  # Two stages (alignment, then everything from the alignment weights) of 2 steps each.
  assert [s["stage"] for s in first["stages"]] == ["alignment", "instruction"]
  assert [s["step"] for s in first["stages"]] == [2, 2]
  assert first["train"]["resumed_from"] is None
  assert not os.path.exists(os.path.join(workdir, "export_torch_fusion"))

  # Same job, longer: the dataset and tokenizer are reused and both stages resume at step 2.
  config.num_steps = 6
  second = run_lib.run(config, workdir, export=True)
  assert [s["resumed_from"] for s in second["stages"]] == [2, 2]
  assert second["train"]["step"] == 3
  assert second["stage_time_s"]["data+tokenizer"] < 5

  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  report = summary["eval"]
  assert report["all"]["count"] > 0 and 0.0 <= report["all"]["accuracy"] <= 1.0
  assert {t["category"] for t in summary["targets"]} == set(report) - {"all"}
  for name in ("loss_curve.png", "metrics.jsonl", "eval_heldout.json", "eval_heldout.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "tb"))
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()

  # The exported PyTorch-layout checkpoint imports back to the trained parameters, bitwise.
  params, cfg, _, step = load_run(workdir)
  assert step == 3
  model_dir = str(tmp_path / "reimported")
  import_torch(os.path.join(workdir, "export_torch_fusion"), model_dir)
  back, back_cfg = load_model_dir(model_dir)
  assert back_cfg == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, back)
