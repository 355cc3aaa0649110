"""python -m fusion_jax.eval.bench end to end on a tiny random model dir (TSV and jsonl)."""
import base64
import json
import os

import pytest
from PIL import Image

from fusion_jax.eval import bench, bench_metrics, bench_model
from synth_fake_server import server  # noqa: F401 (fixture)
from tests.bench_fixtures import MMB_COLS, png_b64, tiny_model_dir, write_tsv


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_model_dir(str(tmp_path_factory.mktemp("bench")))


def test_tsv_end_to_end(model_dir, tmp_path, capsys):
  rows = [{"index": i, "question": f"What color is the ball {i}?", "A": "red", "B": "blue",
           "answer": "AB"[i % 2], "category": ["color", "count"][i % 2],
           "image": png_b64((40 * i, 20, 200))} for i in range(3)]
  rows.append({"index": 9, "question": "Broken?", "A": "x", "B": "y", "answer": "A",
               "image": "%" * 100})
  rows.append({"index": 10, "question": "Long? " * 300, "A": "x", "B": "y", "answer": "A",
               "image": png_b64()})  # over the model's 512 positions
  truncated = base64.b64encode(base64.b64decode(png_b64(size=(64, 64)))[:60]).decode()
  rows.append({"index": 11, "question": "Truncated?", "A": "x", "B": "y", "answer": "A",
               "image": truncated})  # a PNG header, no pixels: refused when decoded
  data = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows, MMB_COLS)
  out = str(tmp_path / "res" / "mmbench.json")
  bench.main(["--workdir", model_dir, "--benchmark", "MMBench_DEV_EN", "--data", str(data),
              "--out", out, "--batch_size", "2", "--max_new_tokens", "3"])
  rep = json.load(open(out))
  assert rep["count"] == 3 and rep["skipped"] == 3
  why = {s["index"]: s["reason"] for s in rep["skipped_rows"]}
  assert sorted(why) == ["10", "11", "9"]
  assert "the limit is 512" in why["10"] and "--seq_len raises it" in why["10"]
  assert "corrupt_image" in why["11"]
  assert set(rep["categories"]) == {"color", "count"}
  preds = rep["predictions"]
  assert len(preds) == 3 and all(isinstance(p["prediction"], str) for p in preds)
  assert rep["metrics"]["accuracy"] == sum(p["correct"] for p in preds) / 3
  assert os.path.getsize(out.replace(".json", ".png")) > 0
  printed = capsys.readouterr().out
  assert "skipped 9:" in printed and "overall" in printed


def test_mmstar_tsv_end_to_end(model_dir, tmp_path):
  cols = ["index", "question", "A", "B", "answer", "category", "l2-category", "image"]
  rows = [{"index": i, "question": "Which colour? Options: A: red, B: blue", "A": "red",
           "B": "blue", "answer": "AB"[i % 2], "category": ["math", "coarse perception"][i // 2],
           "l2-category": ["geometry", "image emotion"][i // 2],
           "image": png_b64((60 * i, 20, 200))} for i in range(4)]
  data = write_tsv(tmp_path / "MMStar.tsv", rows, cols)
  out = str(tmp_path / "mmstar.json")
  bench.main(["--workdir", model_dir, "--benchmark", "MMStar", "--data", str(data),
              "--out", out, "--batch_size", "2", "--max_new_tokens", "3"])
  rep = json.load(open(out))
  assert rep["count"] == 4 and set(rep["categories"]) == {"math", "coarse perception"}
  right = {p["l2_category"]: [] for p in rep["predictions"]}
  for p in rep["predictions"]:
    right[p["l2_category"]].append(p["correct"])
  assert rep["metrics"]["average"] == sum(sum(v) / len(v) for v in right.values()) / 2
  with pytest.raises(ValueError, match="--circular applies to multiple-choice"):
    bench.evaluate_rows(bench.get_benchmark("MMStar"), [], lambda prompts: [], circular=True)


def test_jsonl_end_to_end_answers_match_generate(model_dir, tmp_path):
  os.makedirs(tmp_path / "img")
  for i, color in enumerate([(250, 0, 0), (0, 0, 250)]):
    Image.new("RGB", (30, 20), color).save(tmp_path / "img" / f"{i}.png")
  qs = [{"question_id": i, "image": f"{i % 2}.png", "text": f"Is there a ball {i}?",
         "category": "random"} for i in range(3)]
  (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs))
  (tmp_path / "a.jsonl").write_text("\n".join(
      json.dumps({"question_id": i, "label": ["yes", "no"][i % 2]}) for i in range(3)))
  out = str(tmp_path / "pope.json")
  bench.main(["--workdir", model_dir, "--benchmark", "pope", "--data", str(tmp_path / "q.jsonl"),
              "--answers", str(tmp_path / "a.jsonl"), "--image_root", str(tmp_path / "img"),
              "--out", out, "--batch_size", "2", "--max_new_tokens", "3"])
  rep = json.load(open(out))
  assert rep["count"] == 3 and rep["skipped"] == 0
  assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(rep["metrics"])
  # sorted, chunked, images decoded here: the same answers as generate.answer on the files
  from fusion_jax.infer.generate import answer
  model = bench_model.load(model_dir)
  prompts = [(bench.get_benchmark("pope").prompt(r), str(tmp_path / "img" / f"{i % 2}.png"))
             for i, r in enumerate(bench.read_rows(str(tmp_path / "q.jsonl"),
                                                   answers=str(tmp_path / "a.jsonl"),
                                                   image_root=str(tmp_path / "img"))[0])]
  recs = [{"id": str(i), "image": im, "conversations": [{"from": "human",
                                                        "value": "<image>\n" + t}]}
          for i, (t, im) in enumerate(prompts)]
  ref = answer(model.params, model.cfg, model.tokenizer, recs, q=model.q,
               seq_len=model.seq_len, max_questions=1, max_new_tokens=3, batch_size=2)
  assert [p["prediction"] for p in rep["predictions"]] == ref


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--workdir", model_dir, "--benchmark", "pope", "--data",
                str(tmp_path / "none.tsv"), "--out", str(tmp_path / "x.json")])
  assert e.value.code == 2 and "no such file" in capsys.readouterr().err
  (tmp_path / "q.jsonl").write_text("{}")
  with pytest.raises(SystemExit):
    bench.main(["--workdir", model_dir, "--benchmark", "pope", "--data",
                str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "x.json")])
  assert "--answers" in capsys.readouterr().err


def test_newer_benchmarks_end_to_end(model_dir, tmp_path):
  """OCRBench, HallusionBench and MMMU (a two-image row: asked with its first image) through the
  command line in one process, on the model the tests above compiled."""
  img, img2 = png_b64((10, 200, 10)), png_b64((200, 200, 10))
  ocr = write_tsv(tmp_path / "OCRBench.tsv", [
      {"index": i, "image": img, "question": f"What is written {i}?", "answer": "['a', 'b']",
       "category": ["Regular Text Recognition", "Doc-oriented VQA"][i]} for i in range(2)],
      ["index", "image", "question", "answer", "category"])
  hb = write_tsv(tmp_path / "HallusionBench.tsv", [
      {"index": f"VD_chart_0_0_0_{i}", "image": img if i == 0 else "VD_chart_0_0_0_0",
       "question": f"Is it red {i}?", "answer": ["Yes", "No"][i], "category": "VD",
       "l2-category": "chart"} for i in range(2)],
      ["index", "image", "question", "answer", "category", "l2-category"])
  mmmu = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [
      {"index": 1, "image": str([img, img2]), "question": "<image 1> or <image 2>?",
       "A": "first", "B": "second", "answer": "A", "category": "Art"},
      {"index": 2, "image": img, "question": "How many? <image 1>", "answer": "2",
       "category": "Math"}], ["index", "image", "question", "A", "B", "answer", "category"])
  reports = {}
  for name, data in (("OCRBench", ocr), ("HallusionBench", hb), ("MMMU_DEV_VAL", mmmu)):
    out = str(tmp_path / f"{name}.json")
    bench.main(["--workdir", model_dir, "--benchmark", name, "--data", str(data), "--out", out,
                "--batch_size", "2", "--max_new_tokens", "3"])
    reports[name] = json.load(open(out))
    assert reports[name]["count"] == 2 and reports[name]["skipped"] == 0
    assert os.path.getsize(out.replace(".json", ".png")) > 0
  ocr_rep = reports["OCRBench"]
  assert set(ocr_rep["categories"]) == {"Text Recognition", "Doc-oriented VQA"}
  assert ocr_rep["metrics"]["score"] == sum(p["correct"] for p in ocr_rep["predictions"])
  assert {"aAcc", "fAcc", "qAcc"} <= set(reports["HallusionBench"]["metrics"])
  m = reports["MMMU_DEV_VAL"]["metrics"]
  assert m["multi_image"] == 1 and set(reports["MMMU_DEV_VAL"]["categories"]) >= {"Art", "Math"}


def test_judge_flags_end_to_end(model_dir, tmp_path, capsys, server, monkeypatch):
  """HallusionBench with --judge_url: the answers YOrN_Extraction cannot read go to the judge
  (here a scripted server answering "No"), the report names it; a rule-only benchmark refuses
  the flag before loading the model."""
  import synth_fake_server
  monkeypatch.setattr(synth_fake_server, "model_reply", lambda payload: "No")
  img = png_b64((10, 200, 10))
  hb = write_tsv(tmp_path / "HallusionBench.tsv", [
      {"index": f"VD_chart_0_0_0_{i}", "image": img, "question": f"Is it red {i}",
       "answer": "No", "category": "VD", "l2-category": "chart"} for i in range(3)],
      ["index", "image", "question", "answer", "category", "l2-category"])
  out = str(tmp_path / "hb.json")
  judge_flags = ["--judge_url", server.url, "--judge_model", "local-judge",
                 "--judge_api_key_env", ""]
  bench.main(["--workdir", model_dir, "--benchmark", "HallusionBench", "--data", str(hb),
              "--out", out, "--max_new_tokens", "3", *judge_flags])
  rep = json.load(open(out))
  unread = [p for p in rep["predictions"] if bench_metrics.yes_no(p["prediction"]) == "unknown"]
  assert unread and rep["judge"]["model"] == "local-judge"
  assert rep["judge"]["calls"] == len(unread)
  assert all(p["extracted"] == "no" and p["judge_tries"] == 1 for p in unread)
  assert "judge local-judge at" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    bench.main(["--workdir", str(tmp_path / "no_model"), "--benchmark", "GQA", "--data",
                str(hb), "--out", out, *judge_flags])
  assert e.value.code == 2 and "scored by rules alone" in capsys.readouterr().err


def test_mcq_judge_flags_end_to_end(model_dir, tmp_path, server, monkeypatch):
  """MMBench --circular with --judge_url: the rotations the rules cannot read go to the judge
  (a scripted server answering "A"), VLMEvalKit's circular way; the report counts its calls."""
  import synth_fake_server
  from fusion_jax.eval import bench_mcq_judge
  monkeypatch.setattr(synth_fake_server, "model_reply", lambda payload: "A")
  opts = {"A": "red", "B": "blue"}
  data = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
      {"index": i, "question": f"What color is the ball {i}?", **opts, "answer": "AB"[i % 2],
       "category": "color", "image": png_b64((40 * i, 20, 200))} for i in range(3)], MMB_COLS)
  out = str(tmp_path / "mmb.json")
  bench.main(["--workdir", model_dir, "--benchmark", "MMBench", "--data", str(data), "--out", out,
              "--max_new_tokens", "3", "--circular", "--judge_url", server.url, "--judge_model",
              "local-judge", "--judge_api_key_env", ""])
  rep = json.load(open(out))
  judged = [p for p in rep["predictions"] if "judge" in p]
  assert judged and rep["judge"]["calls"] == len(judged) and rep["judge"]["random_picks"] == 0
  assert all(p["extracted"] == "A" and p["judge_tries"] == 1 for p in judged)
  assert all(bench_mcq_judge.unread(p["prediction"], "", opts) for p in judged)
  assert all(bench_metrics.extract_choice(p["prediction"], opts) == "" for p in judged)
  for p in rep["predictions"]:  # an unread rotation left unjudged: its question failed already
    if "judge" not in p and not bench_metrics.extract_choice(p["prediction"], opts):
      assert any(int(o["index"]) % 10**6 == int(p["index"]) % 10**6 and not o["correct"]
                 for o in rep["predictions"] if o is not p)
