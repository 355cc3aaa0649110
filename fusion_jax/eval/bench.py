r"""Evaluate a FUSION model on a benchmark file, with the benchmark's official metric.

  python -m fusion_jax.eval.bench --workdir DIR --benchmark MMBench --data MMBench_DEV_EN.tsv \
      --out mmbench.json [--limit N] [--batch_size 8] [--circular] [--step N] [--dtype bfloat16]
  python -m fusion_jax.eval.bench --workdir DIR --benchmark POPE --data llava_pope_test.jsonl \
      --answers coco_pope_all.jsonl --image_root val2014/ --out pope.json

DIR is a training workdir or a model dir (import_torch / import_hf). --data is a VLMEvalKit TSV
(base64 images inside) or a LLaVA question jsonl with --answers (fusion_jax/eval/bench_formats.py).
Benchmarks: MMBench, POPE, MME, ScienceQA_IMG, TextVQA_VAL, GQA, MMVP, CV-Bench, AI2D, MMStar,
SEEDBench_IMG, OCRBench, ChartQA, DocVQA_VAL, InfoVQA_VAL, VizWiz (VizWiz_VQA_VAL), RealWorldQA,
HallusionBench, MME-RealWorld, MMMU (MMMU_DEV_VAL, mmmu_val; several images per row: the first is
asked, rows with more are counted), MathVista (MathVista_MINI; VLMEvalKit's rules, without a
judge a lower bound of the judged score) (names match case-insensitively by their longest
prefix: MMBench_DEV_EN, CV-Bench-2D, AI2D_TEST, ChartQA_TEST, MME-RealWorld-Lite, ...). Prompts
follow the lmms-eval tasks (bench_prompts.py; MathVista: VLMEvalKit's), answers are greedy and
batched (bench_model.py), metrics are the official ones (bench_metrics.py, bench_ocr.py,
bench_realworld.py, bench_mmmu.py, bench_mathvista.py). Writes --out (JSON: metrics,
per-category metrics, `count` = rows scored, skipped rows with their index and reason, every
prediction) and a bar chart next to it (.png), and prints the per-category table.

--circular (MMBench, ScienceQA_IMG, MMVP, CV-Bench, AI2D, SEEDBench_IMG: the multiple-choice
benchmarks whose options are columns): accuracy per question, right only if every
rotation of its options is answered right (MMBench's CircularEval); the rotations are the file's
circular copies (index + k * 1e6, as in VLMEvalKit's MMBench TSVs) or, where the file has none,
made here. Without it, circular copies in the file are not asked.

--judge_url URL --judge_model NAME (MMBench, POPE, MME, ScienceQA_IMG, MMVP, CV-Bench,
HallusionBench, MathVista: `Benchmark.judged`): VLMEvalKit's judge step, its prompts sent to an
OpenAI-compatible chat endpoint, for the answers the rules cannot read (bench_judge.py,
bench_mcq_judge.py). Without it nothing is sent anywhere.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags

from fusion_jax import cli
from fusion_jax.eval import (bench_formats, bench_judge, bench_mathvista, bench_metrics,
                             bench_mmmu, bench_ocr, bench_prompts, bench_realworld)
from fusion_jax.eval.bench_formats import CIRCULAR_OFFSET, Row


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """How one benchmark is asked and scored.

  max_new_tokens: lmms-eval's generation limit for the task (MMBench and CV-Bench, 1024 there,
  are capped at 64: their answers are one letter; the TextVQA, MMStar, SEED-Bench and VizWiz
  tasks name none: 32; MathVista, 16384 in lmms-eval's mathvista_testmini tasks and the model's
  own in VLMEvalKit (2048 for LLaVA), is capped at 512: its rules read a free-form answer only
  when the whole answer is the number, and a letter near the end; 512 leaves room for a short
  working before it).
  first_image: a row with several images is asked with its first (else it is skipped).
  """
  name: str
  prompt: Callable[[Row], str]
  score: Callable[..., dict[str, Any]]
  primary: str
  max_new_tokens: int
  multiple_choice: bool = False
  circular: bool = True  # multiple choice: --circular may rotate the option columns
  first_image: bool = False
  judged: bool = False  # its scorer takes a judge (bench_judge.py) for what the rules miss


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("MMBench", bench_prompts.mmbench, bench_metrics.score_multiple_choice,
              "accuracy", 64, multiple_choice=True, judged=True),
    Benchmark("POPE", bench_prompts.short_answer, bench_metrics.score_pope, "f1", 128,
              judged=True),
    Benchmark("MME", bench_prompts.mme, bench_metrics.score_mme, "score", 16, judged=True),
    Benchmark("ScienceQA_IMG", bench_prompts.scienceqa, bench_metrics.score_multiple_choice,
              "accuracy", 16, multiple_choice=True, judged=True),
    Benchmark("TextVQA_VAL", bench_prompts.textvqa, bench_metrics.score_vqa, "vqa_accuracy", 32),
    Benchmark("GQA", bench_prompts.short_answer, bench_metrics.score_exact, "accuracy", 16),
    Benchmark("MMVP", bench_prompts.mmvp, bench_metrics.score_mmvp, "accuracy", 16,
              multiple_choice=True, judged=True),
    Benchmark("CV-Bench", bench_prompts.cv_bench, bench_metrics.score_cv_bench, "accuracy", 64,
              multiple_choice=True, judged=True),
    # AI2D and SEEDBench_IMG take no judge, not even with --circular: lmms-eval's rules score them.
    Benchmark("AI2D", bench_prompts.ai2d, bench_metrics.score_ai2d, "accuracy", 16,
              multiple_choice=True),
    # No --circular: MMStar's options are part of its question text.
    Benchmark("MMStar", bench_prompts.mmstar, bench_metrics.score_mmstar, "average", 32,
              multiple_choice=True, circular=False),
    Benchmark("SEEDBench_IMG", bench_prompts.seedbench, bench_metrics.score_seedbench,
              "accuracy", 32, multiple_choice=True),
    Benchmark("OCRBench", bench_prompts.ocrbench, bench_ocr.score_ocrbench, "score", 128),
    Benchmark("ChartQA", bench_prompts.chartqa, bench_ocr.score_chartqa, "relaxed_overall",
              16),
    Benchmark("DocVQA_VAL", bench_prompts.docvqa, bench_ocr.score_anls, "anls", 32),
    Benchmark("InfoVQA_VAL", bench_prompts.docvqa, bench_ocr.score_anls, "anls", 32),
    Benchmark("VizWiz", bench_prompts.vizwiz, bench_metrics.score_vqa, "vqa_accuracy", 32),
    # RealWorldQA, MME-RealWorld and MMMU are multiple choice, but not MMBench-style: their
    # options are not rotated (--circular) and their own extraction reads the letter.
    Benchmark("RealWorldQA", bench_prompts.realworldqa, bench_realworld.score_realworldqa,
              "accuracy", 16),
    Benchmark("HallusionBench", bench_prompts.hallusionbench, bench_realworld.score_hallusionbench,
              "aAcc", 128, judged=True),
    Benchmark("MME-RealWorld", bench_prompts.mme_realworld, bench_realworld.score_mme_realworld,
              "accuracy", 16),
    Benchmark("MMMU", bench_prompts.mmmu, bench_mmmu.score_mmmu, "accuracy", 128,
              first_image=True),
    # No --circular: its choices are a `choices` list and part of the question text.
    Benchmark("MathVista", bench_prompts.mathvista, bench_mathvista.score_mathvista, "accuracy",
              512, judged=True),
)}


def _key(name: str) -> str:
  return re.sub(r"[^a-z0-9]", "", name.lower())


def get_benchmark(name: str) -> Benchmark:
  """The benchmark whose name (case, '-' and '_' ignored) starts `name`, the longest such:
  'mmbench_dev_en' -> MMBench, 'scienceqa_img' -> ScienceQA_IMG, 'cv-bench-2d' -> CV-Bench,
  'mme-realworld-lite' -> MME-RealWorld (not MME)."""
  k = _key(name)
  prefixes = {n: _key(n).removesuffix("img").removesuffix("val") for n in BENCHMARKS}
  hits = [n for n, p in prefixes.items() if k.startswith(p)]
  if not hits:
    raise ValueError(f"--benchmark {name!r}: unknown; choose one of {', '.join(BENCHMARKS)}")
  return BENCHMARKS[max(hits, key=lambda n: len(prefixes[n]))]


def read_rows(data: str, *, answers: str = "", image_root: str = ""
              ) -> tuple[list[Row], list[tuple[str, str]]]:
  """(rows, bad rows) of a VLMEvalKit TSV, or of a LLaVA question jsonl with its answers."""
  if not os.path.isfile(data):
    raise FileNotFoundError(f"--data {data}: no such file")
  if data.endswith(".tsv"):
    return bench_formats.read_tsv(data)
  if data.endswith((".jsonl", ".json")):
    if not answers:
      raise ValueError(f"--data {data} is a question jsonl: pass --answers FILE with the "
                       "references (question_id -> answer)")
    root = image_root or os.path.dirname(os.path.abspath(data))
    return bench_formats.read_jsonl(data, bench_formats.answers_for_jsonl(answers),
                                    image_root=root)
  raise ValueError(f"--data {data}: expected a VLMEvalKit .tsv or a LLaVA question .jsonl")


def _is_copy(row: Row) -> bool:
  try:
    return int(row.index) >= CIRCULAR_OFFSET
  except ValueError:
    return False


def judged_names() -> str:
  """The benchmarks that take --judge_url, in table order."""
  return ", ".join(n for n, b in BENCHMARKS.items() if b.judged)


def check_judge(bench: Benchmark, judge: bench_judge.Judge | None) -> None:
  if judge is not None and not bench.judged:
    raise ValueError(f"--judge_url: {bench.name} is scored by rules alone; a judge applies to "
                     f"{judged_names()}")


def evaluate_rows(bench: Benchmark, rows: Sequence[Row], predict: Callable[[list[tuple[str, Any]]],
                  list[str | None]], *, circular: bool = False,
                  judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """Asks `predict` every row's prompt and scores the answers.

  predict: [(prompt text, image)] -> answers (bench_model.Refused: the prompt could not be
  asked). judge: for a benchmark with a judge step (`Benchmark.judged`), what reads the answers
  its rules cannot. Returns the scorer's report plus `skipped` [(index, reason)] for unasked
  rows.
  """
  from fusion_jax.eval.bench_model import Refused
  rows = list(rows)
  check_judge(bench, judge)
  if circular and not (bench.multiple_choice and bench.circular):
    raise ValueError(f"--circular applies to multiple-choice benchmarks whose options are "
                     f"columns (not {bench.name})")
  if bench.multiple_choice:
    rows = (bench_metrics.circular_rows(rows) if circular
            else [r for r in rows if not _is_copy(r)])
  skipped = []
  if not bench.first_image:
    skipped = [(r.index, f"{r.image_count} images in one row (multi-image questions are "
                f"unsupported for {bench.name})") for r in rows if r.image_count > 1]
    rows = [r for r in rows if r.image_count <= 1]
  preds = predict([(bench.prompt(r), r.image) for r in rows])
  refused = [isinstance(p, Refused) for p in preds]
  skipped += [(r.index, p.reason) for r, p, no in zip(rows, preds, refused) if no]
  if circular:  # a question with an unasked rotation cannot be scored
    lost = {bench_formats.group_index(rows[i]) for i, no in enumerate(refused) if no}
    keep = [i for i, r in enumerate(rows) if bench_formats.group_index(r) not in lost]
    kept = set(keep)
    skipped += [(rows[i].index, "another rotation of this question could not be asked")
                for i in range(len(rows)) if i not in kept and not refused[i]]
  else:
    keep = [i for i, no in enumerate(refused) if not no]
  kept_rows, kept_preds = [rows[i] for i in keep], [preds[i] for i in keep]
  if not kept_rows:
    first = f"; row {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
    raise ValueError(f"{bench.name}: no row could be scored ({len(skipped)} skipped{first})")
  if circular:
    rep = bench_metrics.score_multiple_choice(kept_rows, kept_preds, circular=True, judge=judge)
  elif bench.judged:
    rep = bench.score(kept_rows, kept_preds, judge=judge)
  else:
    rep = bench.score(kept_rows, kept_preds)
  rep["skipped"] = skipped
  return rep


def format_table(report: Mapping[str, Any]) -> str:
  """Per-category metrics, then the overall line, as fixed-width text."""
  lines_in = [*report["categories"].items(), ("overall", report["metrics"])]
  keys = [k for k in report["metrics"] if k != "count"]
  for _, m in lines_in:
    keys += [k for k in m if k not in keys and k != "count"]
  width = max(12, *(len(c) for c, _ in lines_in))

  def cell(v: Any) -> str:
    if v is None:
      return f"{'':>10}"
    return f"{v:>10.3f}" if isinstance(v, float) and abs(v) <= 1 else f"{v:>10.4g}"

  out = [f"{'category':<{width}} " + " ".join(f"{k[:10]:>10}" for k in keys) + f" {'count':>6}"]
  for c, m in lines_in:
    out.append(f"{c:<{width}} " + " ".join(cell(m.get(k)) for k in keys)
               + f" {m.get('count', 0):>6d}")
  return "\n".join(out)


def plot(report: Mapping[str, Any], bench: Benchmark, path: str) -> None:
  """Bar chart of the benchmark's primary metric per category (overall as the last bar)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cats = [c for c, m in report["categories"].items() if bench.primary in m]
  vals = [report["categories"][c][bench.primary] for c in cats]
  if bench.primary in report["metrics"]:
    cats.append("overall")
    vals.append(report["metrics"][bench.primary])
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cats)), 4))
  ax.bar(range(len(cats)), vals, color=["tab:blue"] * (len(cats) - 1) + ["tab:orange"])
  ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right", fontsize=8)
  ax.set_ylabel(bench.primary)
  ax.set_title(f"{bench.name}: {report.get('model', '')}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(workdir: str, benchmark: str, data: str, out: str, *, answers: str = "",
        image_root: str = "", limit: int | None = None, batch_size: int = 8,
        circular: bool = False, step: int | None = None, dtype: str | None = None,
        max_new_tokens: int = 0, seq_len: int | None = None,
        judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """Loads the model, evaluates, writes `out` (JSON) and its .png; returns the report."""
  from fusion_jax.eval import bench_model
  t0 = time.time()
  bench = get_benchmark(benchmark)
  check_judge(bench, judge)  # before the model loads and generates
  rows, bad = read_rows(data, answers=answers, image_root=image_root)
  rows = bench_formats.limit_rows(rows, limit)
  model = bench_model.load(workdir, step=step, dtype=dtype, seq_len=seq_len)

  def progress(done: int, total: int) -> None:
    print(f"\r{bench.name}: {done}/{total} prompts", end="", file=sys.stderr, flush=True)

  def predict(prompts):
    return bench_model.generate(model, prompts, batch_size=batch_size, progress=progress,
                                max_new_tokens=max_new_tokens or bench.max_new_tokens)

  rep = evaluate_rows(bench, rows, predict, circular=circular, judge=judge)
  print(file=sys.stderr)
  skipped = [{"index": i, "reason": r} for i, r in [*bad, *rep.pop("skipped")]]
  report = {"benchmark": bench.name, "data": os.path.abspath(data), "model": model.name,
            "step": model.step, "circular": circular, "count": rep["metrics"]["count"],
            "skipped": len(skipped), "judge": judge.summary() if judge else None,
            "metrics": rep["metrics"], "categories": rep["categories"],
            "skipped_rows": skipped, "wall_time_s": round(time.time() - t0, 1),
            "predictions": rep["rows"]}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  plot(report, bench, os.path.splitext(out)[0] + ".png")
  print(f"{bench.name} on {data} ({model.name}): {report['count']} rows scored, "
        f"{len(skipped)} skipped")
  if judge is not None:
    j = report["judge"]
    print(f"judge {j['model']} at {j['url']}: {j['calls']} calls, {j['failed_calls']} failed"
          + (f" (last: {j['last_error']})" if j["failed_calls"] else "")
          + (f", {j['random_picks']} answers picked at random (VLMEvalKit's fallback)"
             if j["random_picks"] else ""))
  for s in skipped[:10]:
    print(f"  skipped {s['index']}: {s['reason']}")
  print(format_table(report))
  return report


PROG = "python -m fusion_jax.eval.bench"


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli); --workdir/--step/--dtype as every loader."""
  from fusion_jax.infer.load import define_loader_flags
  define_loader_flags(fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_string("benchmark", None, ", ".join(BENCHMARKS), flag_values=fv, required=True)
  flags.DEFINE_string("data", None, "VLMEvalKit .tsv or LLaVA question .jsonl", flag_values=fv,
                      required=True)
  flags.DEFINE_string("out", None, "report JSON (the chart goes next to it)", flag_values=fv,
                      required=True)
  flags.DEFINE_string("answers", "", "references for a question jsonl", flag_values=fv)
  flags.DEFINE_string("image_root", "", "images of a question jsonl (default: its directory)",
                      flag_values=fv)
  flags.DEFINE_integer("limit", None, "first N questions only", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "questions per generation batch", flag_values=fv)
  flags.DEFINE_boolean("circular", False, "all option rotations must be right", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 0, "0: the benchmark's default", flag_values=fv)
  flags.DEFINE_string("judge_url", "", "OpenAI-compatible endpoint of a judge model for the "
                      f"answers the rules cannot read ({judged_names()}; "
                      "e.g. http://localhost:8000/v1); none: rules only", flag_values=fv)
  flags.DEFINE_string("judge_model", "", "the judge's served model name", flag_values=fv)
  flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "environment variable with the "
                      "judge's bearer token (unset: none sent)", flag_values=fv)
  flags.DEFINE_integer("judge_workers", 4, "judge requests in flight at once", flag_values=fv)


def _run(a) -> None:
  try:
    judge = bench_judge.build(a.judge_url, a.judge_model, a.judge_api_key_env, a.judge_workers)
    run(a.workdir, a.benchmark, a.data, a.out, answers=a.answers, image_root=a.image_root,
        limit=a.limit, batch_size=a.batch_size, circular=a.circular, step=a.step,
        dtype=a.dtype, max_new_tokens=a.max_new_tokens, seq_len=a.seq_len, judge=judge)
  except (ValueError, FileNotFoundError) as e:
    cli.usage_error(PROG, str(e))


def main(argv: Sequence[str] | None = None) -> None:
  """The command line in process: argv as typed after the program name."""
  _run(cli.parse(define_flags, argv, PROG))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG)
