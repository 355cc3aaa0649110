"""eval.bench's optional judge (fusion_jax/eval/bench_judge.py, bench_mcq_judge.py) against a
scripted OpenAI-compatible server: what is sent (VLMEvalKit's prompts, temperature 0.5 * try;
multiple choice: 3 tries at 0), which answers reach it, and how its replies are scored."""
import re

import pytest

from fusion_jax.eval import bench, bench_judge, bench_metrics
from fusion_jax.eval import bench_mathvista as mv
from fusion_jax.eval import bench_mcq_judge as mcq
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
  assert {m for _, _, m, _ in sent} == {2048}  # ImageYORNDataset's judge: OpenAIWrapper's default
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
  with pytest.raises(ValueError, match="AI2D is scored by rules alone; a judge applies to "
                                       "MMBench, POPE, MME, ScienceQA_IMG, MMVP, CV-Bench, "
                                       "HallusionBench, MathVista$"):
    bench.check_judge(bench.get_benchmark("AI2D_TEST"), judge)
  for name in ("MathVista", "MMBench_DEV_EN", "ScienceQA_IMG", "MMVP", "CV-Bench-2D"):
    bench.check_judge(bench.get_benchmark(name), judge)
  with pytest.raises(ValueError, match="GQA is scored by rules alone"):
    bench.evaluate_rows(bench.get_benchmark("GQA"), [], lambda prompts: [], judge=judge)


# ---------------------------------------------------------------- multiple choice (MMBench, ...)
OPTS = {"A": "teddy bear", "B": "rabbit", "C": "cat", "D": "dog"}


def _mc(index, answer, options=OPTS, **kw):
  return Row(str(index), f"What is in image {index}", answer, "cat", options=dict(options), **kw)


def _mcq_sent(server):
  return [(p["messages"][0]["content"], p["temperature"], p["max_tokens"]) for p in server.requests]


def test_mcq_prompt_is_vlmevalkits_verbatim():
  # vlmeval/dataset/utils/multiple_choice.py build_prompt(item['question'],
  # build_option_str(build_choices(item)), item['prediction']) at e8e78f0, run from its source
  assert mcq.prompt("Which animal is it", {"A": "cat", "B": "dog"}, "a small dog") == (
      "You are an AI assistant who will help me to match an answer with several options of a "
      "single-choice question. You are provided with a question, several options, and an "
      "answer, and you need to find which option is most similar to the answer. If the meaning "
      "of all options are significantly different from the answer, output Z. Your should "
      "output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
      "Example 1: \nQuestion: What is the main object in image?\nOptions: A. teddy bear "
      "B. rabbit C. cat D. dog\nAnswer: a cute teddy bear\nYour output: A\nExample 2: \n"
      "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat "
      "D. dog\nAnswer: Spider\nYour output: Z\nExample 3: \nQuestion: Which animal is it?\n"
      "Options: There are several options: \nA. cat\nB. dog\n\nAnswer: a small dog\n"
      "Your output: ")
  cn = mcq.prompt("图中是什么", {"A": "猫", "B": "狗"}, "一只猫")  # build_prompt_cn (cn_string)
  assert cn.startswith("你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。")
  assert cn.endswith("问题: 图中是什么?\n选项: There are several options: \nA. 猫\nB. 狗\n\n"
                     "答案: 一只猫\n输出: ")


def test_mcq_judge_reads_only_what_the_rules_cannot(server):
  rows = [_mc(i, a) for i, a in enumerate("BCBDA")]
  preds = ["(B) rabbit",                                      # the rules read it: never judged
           "Sorry, I can't help with images of people yet.",  # can_infer: 'Z', never judged
           "It hops around the garden.",                      # judged: "B" -> right
           "Probably the animal that barks.",                 # judged: "The answer is C", wrong
           "Hard to say."]                                    # judged: no usable reply
  server.faults = [("text", "B"), ("text", "The answer is C"),
                   ("text", "I am not sure"), ("status", 400), ("text", "none of them")]
  judge = _judge(server)
  rep = bench_metrics.score_multiple_choice(rows, preds, judge=judge)
  got = [(r["extracted"], r.get("judge"), r.get("judge_tries"), r.get("random_pick"))
         for r in rep["rows"]]
  pick = mcq.random_pick(rows[4], OPTS)
  assert pick == "Z" and pick == mcq.random_pick(rows[4], OPTS)  # seeded by the row's index
  assert got == [("B", None, None, None), ("", None, None, None), ("B", "B", 1, False),
                 ("C", "The answer is C", 1, False), (pick, None, 3, True)]
  assert list(rep["rows"][2]) == ["index", "prediction", "extracted", "judge", "judge_tries",
                                  "random_pick", "answer", "correct"]
  assert [r["correct"] for r in rep["rows"]] == [True, False, True, False, False]
  sent = _mcq_sent(server)
  assert sent[0] == (mcq.prompt("What is in image 2", OPTS, "It hops around the garden."), 0.0,
                     2048)
  assert len(sent) == 5 and {(t, m) for _, t, m in sent} == {(0.0, 2048)}  # 3 tries, at 0
  assert judge.summary()["random_picks"] == 1 and judge.summary()["failed_calls"] == 1
  # without a judge: the rules alone, the rows as before (no judge fields)
  alone = bench_metrics.score_multiple_choice(rows, preds)
  assert alone["metrics"]["accuracy"] == 0.2 and len(server.requests) == 5
  assert [list(r) for r in alone["rows"]] == [["index", "prediction", "extracted", "answer",
                                               "correct"]] * 5


def test_mcq_judge_in_circular_evaluation(server):
  # VLMEvalKit mcq_circular_eval: a question with a rotation the rules read wrong fails with no
  # judge call; otherwise its unread rotations are judged in index order until one is wrong
  rows = bench_metrics.circular_rows([_mc(1, "B"), _mc(2, "C"), _mc(3, "D")])
  unreadable = "Hard to say."
  said = {"1": "B", "1000001": unreadable, "2000001": "D", "3000001": unreadable,  # B A D C
          "2": unreadable, "1000002": "A", "2000002": "A", "3000002": "D",      # C B A D
          "3": unreadable, "1000003": "C", "2000003": unreadable, "3000003": "A"}  # D C B A
  assert "".join(bench_metrics.answer_letter(r) for r in rows) == "BCD" "ADC" "BAD" "CBA"
  preds = [said[r.index] for r in rows]
  # question 1: rotations 1 and 3 judged right; question 2: rotation 1 read wrong, nothing
  # judged; question 3: rotation 0 judged wrong, rotation 2 then not judged
  server.faults = [("text", "A"), ("text", "(C)"), ("text", "A")]
  judge = _judge(server)
  rep = bench_metrics.score_multiple_choice(rows, preds, circular=True, judge=judge)
  assert rep["metrics"] == {"accuracy": pytest.approx(1 / 3), "count": 12, "questions": 3}
  judged = {r["index"]: r["judge_tries"] for r in rep["rows"] if "judge" in r}
  assert judged == {"1000001": 1, "3000001": 1, "3": 1}
  assert next(r for r in rep["rows"] if r["index"] == "2000003")["extracted"] == ""
  rot = {r.index: r for r in rows}
  assert [c for c, _, _ in _mcq_sent(server)] == [  # in order; question 3's rotation 2: never
      mcq.prompt(rot[i].question, rot[i].options, unreadable) for i in ("1000001", "3000001", "3")]
  # the same answers without a judge: question 1 and 3 have unread rotations, all wrong
  assert bench_metrics.score_multiple_choice(rows, preds, circular=True)["metrics"][
      "accuracy"] == 0.0


def test_mmvp_and_cv_bench_take_the_judge(server):
  two = {"A": "open", "B": "closed"}
  rows = [_mc(i + 1, a, two, position=i) for i, a in enumerate("AB")]
  server.faults = [("text", "B")]
  rep = bench_metrics.score_mmvp(rows, ["A", "The door is shut."], judge=_judge(server))
  assert rep["metrics"]["pair_accuracy"] == 1.0 and rep["rows"][1]["judge"] == "B"
  server.faults = [("text", "Z")]   # the judge's "none of them": read, wrong
  rep = bench_metrics.score_cv_bench(rows, ["A", "It is ajar."], judge=_judge(server))
  assert rep["rows"][1]["extracted"] == "Z" and rep["metrics"]["accuracy"] == 0.5


def test_mcq_judge_workers_keep_each_rows_reply(server, monkeypatch):
  import synth_fake_server
  # every reply is the letter its own prompt's answer names, whatever order the workers send in
  monkeypatch.setattr(synth_fake_server, "model_reply", lambda payload: re.search(
      r"Answer: Unsure, option-(\w)\n", payload["messages"][0]["content"]).group(1))
  rows = bench_metrics.circular_rows([_mc(i, "ABCD"[i % 4]) for i in range(1, 7)])
  preds = [f"Unsure, option-{bench_metrics.answer_letter(r)}" for r in rows]
  judge = _judge(server, workers=4)
  rep = bench_metrics.score_multiple_choice(rows, preds, circular=True, judge=judge)
  assert rep["metrics"]["accuracy"] == 1.0 and judge.summary()["calls"] == 24
  assert all(r["judge"] == r["extracted"] == r["answer"] for r in rep["rows"])
