"""eval.bench's optional judge (fusion_jax/eval/bench_judge.py) against a scripted
OpenAI-compatible server: what is sent (VLMEvalKit's prompts, temperature 0.5 * try), which
answers reach it, and how its replies are scored."""
import re

import pytest

from fusion_jax.eval import bench, bench_judge
from fusion_jax.eval import bench_mathvista as mv
from fusion_jax.eval import bench_realworld as rw
from fusion_jax.eval.bench_formats import Row
from synth_fake_server import server  # noqa: F401 (fixture)

FRACTIONS = ["3/11", "8/11", "6/11", "3/5"]


def _mv(index, answer, kind, **extra):
  qtype = "multi_choice" if kind == "text" else "free_form"
  return Row(index, f"Hint: ...\nQuestion: q{index}?", answer,
             extra={"question_type": qtype, "answer_type": kind, "task": "t", "skills": "[]",
                    **extra})


def _judge(server, workers=1):  # one at a time: the scripted replies are served in order
  return bench_judge.build(server.url, "judge-model", api_key_env="", workers=workers)


def _sent(server):
  return [(p["messages"][0]["content"], p["temperature"], p["max_tokens"], p["model"])
          for p in server.requests]


def test_mathvista_judge_extracts_only_what_the_rules_cannot_read(server):
  rows = [_mv("1", "8/11", "text", choices=str(FRACTIONS), answer_option="B"),
          _mv("2", "14", "integer"),
          _mv("3", "0.6", "float"),
          _mv("4", "7", "integer")]
  preds = ["(B) 8/11",                          # the rules read the letter: never judged
           "The missing number is 14.",         # judged: "14" -> right
           "About six in ten of them.",         # judged: every try refused -> wrong
           "It is 9."]                          # judged: "9" -> read, wrong
  server.faults = [("text", " 14"), *[("status", 400)] * 5, ("text", "9")]
  judge = _judge(server)
  rep = mv.score_mathvista(rows, preds, judge=judge)
  assert [r["correct"] for r in rep["rows"]] == [True, True, False, False]
  assert "judge" not in rep["rows"][0]
  assert [(r["judge"], r["judge_tries"]) for r in rep["rows"][1:]] == [
      (" 14", 1), (None, 5), ("9", 1)]
  assert rep["rows"][1]["extracted"] == 14 and rep["rows"][3]["extracted"] == 9
  assert rep["metrics"]["accuracy"] == 0.5
  assert rep["metrics"]["prefetch_rate"] == 0.25          # the rules' share, as before
  sent = _sent(server)
  assert len(sent) == 7 and judge.summary()["calls"] == 7
  assert judge.summary()["failed_calls"] == 5 and "HTTP 400" in judge.summary()["last_error"]
  assert sent[0] == (bench_judge.mathvista_prompt("Hint: ...\nQuestion: q2?",
                                                  "The missing number is 14."),
                     0.0, 128, "judge-model")
  assert [t for _, t, _, _ in sent[1:6]] == [0.0, 0.5, 1.0, 1.5, 2.0]
  assert sent[0][0].endswith("Model respone: The missing number is 14.Extracted answer:")
  # without a judge the same answers are a lower bound: only the letter counts
  assert mv.score_mathvista(rows, preds)["metrics"]["accuracy"] == 0.25


def test_hallusionbench_judge_matches_answers_that_are_neither_yes_nor_no(server):
  rows = [Row(f"VD_chart_0_0_{i}_0", "Is the bar red", ans, "VD",
              extra={"l2-category": "chart"}) for i, ans in enumerate(("Yes", "No", "No"))]
  preds = ["Yes, it is.", "The bar looks blue.", "I cannot tell."]
  # row 1: an unusable reply, then "No" on the second try; row 2: "Unknown" on every try
  server.faults = [("text", "Unknown"), ("text", "No"), *[("text", "Unknown")] * 5]
  rep = rw.score_hallusionbench(rows, preds, judge=_judge(server))
  assert [r["extracted"] for r in rep["rows"]] == ["yes", "no", "unknown"]
  assert [r["correct"] for r in rep["rows"]] == [True, True, False]
  assert rep["rows"][1]["judge_tries"] == 2 and rep["rows"][2]["judge_tries"] == 5
  sent = _sent(server)
  assert len(sent) == 7
  assert sent[0][0] == bench_judge.yes_no_prompt("Is the bar red", "The bar looks blue.")
  assert sent[0][0].endswith("Question: Is the bar red?\nAnswer: The bar looks blue.\n"
                             "Your output: ")
  assert [t for _, t, _, _ in sent[:2]] == [0.0, 0.5]
  assert rep["metrics"]["aAcc"] == pytest.approx(2 / 3)
  assert rw.score_hallusionbench(rows, preds)["metrics"]["aAcc"] == pytest.approx(1 / 3)


def test_pope_and_mme_judge_their_unreadable_answers(server):
  from fusion_jax.eval import bench_metrics
  rows = [Row(str(i), f"Is there a dog in the image{i}", ans, "adversarial", image_key="im")
          for i, ans in enumerate(("yes", "no"))]
  preds = ["There is a dog.", "No."]      # row 0 reads as neither: judged "Yes"
  server.faults = [("text", "Yes"), ("text", "Yes")]
  pope = bench_metrics.score_pope(rows, preds, judge=_judge(server))
  assert [r["extracted"] for r in pope["rows"]] == ["yes", "no"]
  assert pope["rows"][0]["judge_tries"] == 1 and "judge" not in pope["rows"][1]
  assert pope["metrics"]["accuracy"] == 1.0
  assert bench_metrics.score_pope(rows, preds)["metrics"]["accuracy"] == 0.5
  mme = bench_metrics.score_mme([Row(r.index, r.question, r.answer, "existence", image_key="im")
                                 for r in rows], preds, judge=_judge(server))
  assert mme["categories"]["existence"]["acc_plus"] == 100.0    # the pair, judged, all right
  assert [p["messages"][0]["content"] for p in server.requests] == [
      bench_judge.yes_no_prompt("Is there a dog in the image0", "There is a dog.")] * 2


def test_judge_workers_keep_each_rows_reply(server, monkeypatch):
  import synth_fake_server
  # every reply is the number in its own prompt, in whatever order the 4 workers send them
  monkeypatch.setattr(synth_fake_server, "model_reply", lambda payload: re.search(
      r"respone: It is (\d+)\.Extracted", payload["messages"][0]["content"]).group(1))
  rows = [_mv(str(i), str(i), "integer") for i in range(12)]
  preds = [f"It is {i}." for i in range(12)]
  judge = _judge(server, workers=4)
  rep = mv.score_mathvista(rows, preds, judge=judge)
  assert [r["extracted"] for r in rep["rows"]] == list(range(12))
  assert rep["metrics"]["accuracy"] == 1.0 and judge.summary()["calls"] == 12


def test_judge_settings_are_checked_before_anything_runs():
  with pytest.raises(ValueError, match="needs --judge_model"):
    bench_judge.build("http://localhost:1/v1", "")
  with pytest.raises(ValueError, match="must start with http"):
    bench_judge.build("localhost:1/v1", "m")
  assert bench_judge.build("", "") is None
  judge = bench_judge.build("http://localhost:1/v1", "m")
  with pytest.raises(ValueError, match="MMBench is scored by rules alone; a judge applies to "
                                       "POPE, MME, HallusionBench, MathVista"):
    bench.check_judge(bench.get_benchmark("MMBench"), judge)
  bench.check_judge(bench.get_benchmark("MathVista"), judge)
