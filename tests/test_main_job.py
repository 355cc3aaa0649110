"""The main job end to end on a shortened smoke config: synthesize -> train -> checkpoint ->
resume -> eval -> export, and the export imports back to identical parameters."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import smoke
from fusion_jax import run as run_lib
from fusion_jax.convert.import_torch import import_torch
from fusion_jax.convert.model_dir import load_model_dir
from fusion_jax.infer.workdir import load_run


def test_short_main_job_resumes_evaluates_and_exports(tmp_path, monkeypatch):
  config = smoke.get_config("short")
  config.synth.cache_dir = str(tmp_path / "cache")
  config.num_steps = 10
  config.checkpoint.every = 2
  workdir = str(tmp_path / "run")

  # SIGTERM's flag (fusion_jax.train.loop._Preemption) at step 2 of the second stage, whose
  # workdir is the run's: the job saves and stops there. Rerunning the same command continues
  # with the same programs, so the second run's compiles come from the compilation cache.
  from fusion_jax.train import loop
  def preempted(self, ckpt, step):
    del self
    return step == 2 and not os.path.relpath(str(ckpt.directory), workdir).startswith("stages")
  with monkeypatch.context() as m:
    m.setattr(loop._Preemption, "reached", preempted)
    first = run_lib.run(config, workdir, export=False)
  assert first["preempted"]
  # Two stages (alignment, then everything from the alignment weights), 0.65 / 0.35 of the steps.
  assert [s["stage"] for s in first["stages"]] == ["alignment", "instruction"]
  assert [s["step"] for s in first["stages"]] == [6, 2]
  assert [s["resumed_from"] for s in first["stages"]] == [None, None]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert not os.path.exists(os.path.join(workdir, "torch_fusion_phi"))
  # The alignment stage trains at its own sequence length (config.stages overrides).
  assert load_run(first["stages"][0]["workdir"])[2].data.seq_len == 128
  assert load_run(workdir)[2].data.seq_len == config.data.seq_len != 128

  # The same command again: the dataset and tokenizer are reused, the finished first stage is
  # not retrained, the second resumes from its checkpoint.
  second = run_lib.run(config, workdir, export=True)
  assert [s["resumed_from"] for s in second["stages"]] == [6, 2]
  assert [s["step"] for s in second["stages"]] == [6, 4]
  assert second["train"]["step"] == 4
  assert second["stage_time_s"]["data+tokenizer"] < 5

  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  report = summary["eval"]
  assert report["all"]["count"] > 0 and 0.0 <= report["all"]["accuracy"] <= 1.0
  assert {t["category"] for t in summary["targets"]} == set(report) - {"all"}
  # The same questions by kind of answer, each kind with its most frequent prediction.
  kinds = summary["eval_kinds"]
  assert kinds["all"]["count"] == report["all"]["count"] and len(kinds) > 1
  assert all(0.0 <= r["top_share"] <= 1.0 for r in kinds.values())
  # One greedy answer per held-out category, next to its reference.
  assert {x["category"] for x in summary["samples"]} == set(report) - {"all"}
  assert all(isinstance(x["answer"], str) and x["reference"] for x in summary["samples"])
  for name in ("loss_curve.png", "metrics.jsonl", "eval_heldout.json", "eval_heldout.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "tb"))
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()

  # The question-answering CLI on the run (KV-cached generation).
  heldout = os.path.join(run_lib.dataset_dir(config.synth), "heldout.json")
  cli = subprocess.run([sys.executable, "-m", "fusion_jax.infer", "--workdir", workdir,
                        "--data", heldout, "--num", "2", "--max_new_tokens", "4"],
                       capture_output=True, text=True, check=True)
  answers = [json.loads(l) for l in cli.stdout.splitlines() if l.startswith("{")]
  assert len(answers) == 2 and all("answer" in a and "reference" in a for a in answers)

  # The exported PyTorch-layout checkpoint imports back to the trained parameters, bitwise.
  params, cfg, _, step = load_run(workdir)
  assert step == 4
  model_dir = str(tmp_path / "reimported")
  # Under a name the authors' loader routes (fusion + phi); the 32 px model is too small for
  # their code: exported anyway, and the summary says so.
  assert summary["files"]["export_torch"] == os.path.join(workdir, "torch_fusion_phi")
  assert "--allow_incompatible" in summary["export_note"]
  import_torch(summary["files"]["export_torch"], model_dir)
  back, back_cfg = load_model_dir(model_dir)
  assert back_cfg == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, back)


def test_stage_overrides_reject_unknown_keys(tmp_path):
  config = smoke.get_config("short")
  data = tmp_path / "train.json"
  data.write_text(json.dumps([{"category": "SynthColor"}]))
  config.data.paths = (str(data),)
  config.stages = (("only", (), 1.0, {"data.seq_lenn": 64}),)
  with pytest.raises(ValueError, match=r"config.stages\[0\] \('only'\): unknown config key "
                     r"'data.seq_lenn'"):
    run_lib.stage_plan(config, str(tmp_path / "run"))
  config.stages = (("only", ()),)
  with pytest.raises(ValueError, match=r"config.stages\[0\]"):
    run_lib.stage_plan(config, str(tmp_path / "run"))
  config.stages = (("only", (), 1.0, {"data.seq_len": 64, "optim.lr": 3e-4}),)
  (_, c, _), = run_lib.stage_plan(config, str(tmp_path / "run"))
  assert (c.data.seq_len, c.optim.lr) == (64, 3e-4)


def test_stage_subset_follows_its_categories(tmp_path):
  """A stage's subset file is cached next to the data; changing the stage's categories under
  the same name must not reuse the old file."""
  config = smoke.get_config("short")
  data = tmp_path / "train.json"
  data.write_text(json.dumps([{"category": "SynthColor", "id": "a"},
                              {"category": "SynthScene", "id": "b"}]))
  config.data.paths = (str(data),)
  cats = {}
  for keep in (("SynthColor",), ("SynthScene",)):
    config.stages = (("align", keep, 0.5), ("all", (), 0.5))
    (_, c, _), _ = run_lib.stage_plan(config, str(tmp_path / "run"))
    with open(c.data.paths[0]) as f:
      cats[keep] = [r["category"] for r in json.load(f)]
  assert cats == {("SynthColor",): ["SynthColor"], ("SynthScene",): ["SynthScene"]}


def test_stage_keeps_the_given_share_of_each_category(tmp_path):
  config = smoke.get_config("short")
  data = tmp_path / "train.json"
  recs = [{"category": c, "id": f"{c}{i}"} for i in range(8) for c in ("SynthColor", "SynthScene")]
  data.write_text(json.dumps(recs))
  config.data.paths = (str(data),)
  config.stages = (("align", {"SynthColor": 0.25, "SynthScene": 1.0}, 0.5), ("all", (), 0.5))
  (_, c, _), _ = run_lib.stage_plan(config, str(tmp_path / "run"))
  with open(c.data.paths[0]) as f:
    ids = [r["id"] for r in json.load(f)]
  assert ids == ["SynthColor0", "SynthScene0", "SynthColor1"] + [f"SynthScene{i}" for i in range(1, 8)]
  config.stages = (("align", {"SynthColor": 0.0}, 0.5), ("all", (), 0.5))
  with pytest.raises(ValueError, match=r"config.stages\[0\] \('align'\): the record fraction "
                     r"of \['SynthColor'\] must be in \(0, 1\]"):
    run_lib.stage_plan(config, str(tmp_path / "run"))


def test_sample_answers_take_each_categorys_first_question_that_fits():
  from fusion_jax.main_job.evaluate import first_fitting

  def rec(cat: str, question: str, answer: str) -> dict:
    return {"category": cat, "conversations": [{"from": "human", "value": question},
                                               {"from": "gpt", "value": answer}]}

  records = [rec("A", "a long question", "x"), rec("A", "short", "y"), rec("A", "short 2", "z"),
             rec("B", "another long one", "w"), rec("C", "ok", "v")]
  firsts, missing = first_fitting(records, lambda p: "long" not in p["conversations"][0]["value"])
  # A's first question does not fit (a last stage trained shorter than the held-out prompts):
  # its next one stands in; B has none that fits and is named, not a crash at the job's end.
  assert {c: (p["conversations"][0]["value"], r) for c, (p, r) in firsts.items()} == {
      "A": ("short", "y"), "C": ("ok", "v")}
  assert all(len(p["conversations"]) == 1 for p, _ in firsts.values())
  assert missing == ["B"]


def test_dataset_cache_follows_the_synthesizer(tmp_path, monkeypatch):
  """A change to fusion_jax.synth's files (code or prompt templates) gives a new dataset folder:
  the job never trains on cached records the current synthesizer would not draw."""
  import shutil
  import fusion_jax.synth
  from fusion_jax.main_job import prepare
  synth = smoke.get_config("short").synth
  before = prepare.dataset_dir(synth)
  copy = tmp_path / "synth"
  shutil.copytree(os.path.dirname(fusion_jax.synth.__file__), copy,
                  ignore=shutil.ignore_patterns("__pycache__"))
  monkeypatch.setattr(fusion_jax.synth, "__file__", str(copy / "__init__.py"))
  assert prepare.dataset_dir(synth) == before  # the same files: the same folder
  prompt = copy / "prompts" / "answer.md"
  prompt.write_text(prompt.read_text() + "\n")
  changed = prepare.dataset_dir(synth)
  assert changed != before and os.path.dirname(changed) == synth.cache_dir
  synth.num += 1  # the parameters still count
  assert prepare.dataset_dir(synth) not in (before, changed)
