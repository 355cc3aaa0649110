r"""The main job: synthesize -> tokenizer -> train -> evaluate -> sample answers -> export.

  python -m fusion_jax.run --config experiments/smoke.py --workdir runs/smoke

Each stage is skipped when its output exists (the dataset and tokenizer are cached by their
parameters; training resumes from the newest checkpoint), so rerunning a finished or
interrupted job continues it. Writes <workdir>/summary.json and prints a summary table.
"""
from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config (experiments/smoke.py)")
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, eval, export)")
flags.DEFINE_boolean("export", True, "export the final weights with export_torch")
flags.DEFINE_boolean("verbose", False, "show the traceback behind each configuration error")

ACCURACY_TARGET = {"SynthColor": 0.9}
CHANCE_MULTIPLE = 2.0


def _say(msg: str) -> None:
  print(f"[fusion_jax.run] {msg}", flush=True)


def dataset_dir(synth: ml_collections.ConfigDict) -> str:
  """Cache folder of a synthesized dataset, keyed by the parameters that define it."""
  key = json.dumps({k: synth[k] for k in ("num", "seed", "size", "categories", "heldout")},
                   sort_keys=True, default=list)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return os.path.join(synth.cache_dir, f"synth_{synth.size}px_{synth.num}_{digest}")


def synthesize(synth: ml_collections.ConfigDict) -> str:
  """fusion_jax.synth into the cache folder unless it is already there."""
  out = dataset_dir(synth)
  if os.path.isfile(os.path.join(out, "train.json")):
    _say(f"dataset: reusing {out}")
    return out
  from fusion_jax.synth.__main__ import main as synth_main
  tmp = out + ".partial"
  args = ["--out", tmp, "--num", str(synth.num), "--seed", str(synth.seed), "--size",
          str(synth.size), "--heldout", str(synth.heldout), "--overwrite",
          "--categories", *synth.categories]
  _say("dataset: python -m fusion_jax.synth " + " ".join(args))
  rc = synth_main(args)
  if rc:
    raise RuntimeError(f"fusion_jax.synth failed with exit code {rc}")
  os.replace(tmp, out)
  return out


def tokenizer_dir(data_dir: str, vocab_size: int) -> str:
  """A sentencepiece tokenizer trained on the dataset's text (once)."""
  from fusion_jax.data.tokenizer import IMAGE_MARKER
  from fusion_jax.data.tokenizer_train import train_sentencepiece
  out = os.path.join(data_dir, f"tokenizer_{vocab_size}")
  if os.path.isfile(os.path.join(out, "tokenizer.model")):
    _say(f"tokenizer: reusing {out}")
    return out
  with open(os.path.join(data_dir, "train.json")) as f:
    records = json.load(f)
  texts = [t["value"].replace(IMAGE_MARKER, "").strip() for r in records
           for t in r["conversations"]]
  texts += [r["caption"] for r in records if r.get("caption")]
  _say(f"tokenizer: training sentencepiece ({vocab_size} pieces) on {len(texts)} texts")
  train_sentencepiece(texts, os.path.join(out, "tokenizer"), vocab_size)
  return out


def import_base(base: ml_collections.ConfigDict, workdir: str) -> str:
  """The stage-1 start model from the base LLM and SigLIP tower (transformers dirs), written
  by `python -m fusion_jax.convert.import_hf` into <workdir>/base_model (once), as a user
  starting from real base models runs it."""
  from fusion_jax.convert import import_hf
  out = os.path.join(workdir, "base_model")
  if os.path.isfile(os.path.join(out, "fusion_config.json")):
    _say(f"base model: reusing {out}")
    return out
  args = ["--llm", base.llm, "--vision", base.vision, "--preset", base.preset, "--out", out]
  _say("base model: python -m fusion_jax.convert.import_hf " + " ".join(args))
  if import_hf.main(args):
    raise RuntimeError(f"import_hf failed for {base.llm} + {base.vision}")
  _say(f"base model: weights only are used; the FUSION fields (template, interaction schedule) "
       f"come from config.model, not from preset {base.preset!r}")
  return out


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None
            ) -> ml_collections.ConfigDict:
  """Fills config.data (paths, image_root, tokenizer) and the vocabulary from the tokenizer.

  With config.base (llm, vision, preset: transformers dirs, e.g. assets/tiny_bases) and a
  workdir, the base models are imported (`import_base`), training starts from them
  (config.init_from) and the tokenizer is the base LLM's; otherwise a tokenizer is trained on
  the dataset and the model starts from random init.
  """
  from fusion_jax.data.tokenizer import TEMPLATE_PAD_TOKENS, load_tokenizer
  data_dir = synthesize(config.synth)
  base = config.get("base")
  model_dir = ""
  if base and base.get("llm") and workdir:
    model_dir = import_base(base, os.path.abspath(workdir))
    tok_dir = os.path.join(model_dir, "tokenizer")
  else:
    tok_dir = tokenizer_dir(data_dir, int(config.tokenizer.vocab_size))
  from fusion_jax.train.fusion_task import fusion_config_from
  template = fusion_config_from(config.model).template
  tok = load_tokenizer(tok_dir, pad_token=TEMPLATE_PAD_TOKENS[template])
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.paths = (os.path.join(data_dir, "train.json"),)
  config.data.image_root = data_dir
  config.data.tokenizer = tok_dir
  llm = dict(config.model.overrides.get("llm", {}))
  if model_dir:
    # The imported embedding has exactly len(tokenizer) rows (import_hf adds the 2 vision rows).
    from fusion_jax.convert.model_dir import load_model_config
    llm.update(vocab_size=load_model_config(model_dir).llm.vocab_size, pad_token_id=tok.pad_id)
    config.init_from = config.init_from or model_dir
  else:
    # Round the vocabulary up so it splits over any tensor axis up to 8.
    llm.update(vocab_size=-(-len(tok) // 8) * 8, pad_token_id=tok.pad_id)
  config.model.overrides.llm = llm
  return config


def target_of(category: str, chance: float) -> float:
  """The accuracy a category must reach: its own target or CHANCE_MULTIPLE x chance."""
  return max(ACCURACY_TARGET.get(category, 0.0), CHANCE_MULTIPLE * chance)


def check_targets(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
  """(category, target text, met) for the main job's accuracy targets."""
  rows = []
  for cat, r in report.items():
    if cat == "all":
      continue
    need = target_of(cat, r["chance"])
    rows.append((cat, f">= {need:.2f}", r["accuracy"] >= need))
  return rows


def _override(c: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
  """c[key] = value for a dotted key that must already exist (typos fail here, not later)."""
  *path, last = key.split(".")
  node = c
  for p in path:
    if p not in node:
      raise ValueError(f"{where}: unknown config key {key!r} (no {p!r})")
    node = node[p]
  if last not in node:
    raise ValueError(f"{where}: unknown config key {key!r}")
  node[last] = value


def stage_plan(config: ml_collections.ConfigDict, workdir: str
               ) -> list[tuple[str, ml_collections.ConfigDict, str]]:
  """[(name, config, workdir)] of the training stages (spec 8: each starts from the previous
  stage's weights with a fresh optimizer). config.stages = ((name, categories, step fraction
  [, overrides]), ...), categories () = all; overrides maps dotted config keys to this stage's
  values (spec 8 gives each stage its own max length, batch and learning rates), e.g.
  {"data.seq_len": 128}. The last stage trains in `workdir` itself, earlier ones in
  <workdir>/stages/<name>. Without config.stages: one stage on all data."""
  stages = tuple(config.get("stages") or (("all", (), 1.0),))
  data_file = config.data.paths[0]
  with open(data_file) as f:
    records = json.load(f)
  plan, previous = [], ""
  for i, stage in enumerate(stages):
    if len(stage) not in (3, 4):
      raise ValueError(f"config.stages[{i}] = {stage!r}: expected (name, categories, step "
                       "fraction) or (name, categories, step fraction, {dotted key: value})")
    name, categories, frac = stage[:3]
    c = ml_collections.ConfigDict(config.to_dict())
    c.num_steps = max(1, int(round(float(frac) * int(config.num_steps))))
    for key, value in dict(stage[3] if len(stage) == 4 else {}).items():
      _override(c, key, value, where=f"config.stages[{i}] ({name!r})")
    if categories:
      subset = os.path.join(os.path.dirname(data_file), f"train_{name}.json")
      if not os.path.isfile(subset):
        keep = [r for r in records if r.get("category") in set(categories)]
        if not keep:
          raise ValueError(f"stage {name!r}: no training record of categories {categories}")
        with open(subset + ".tmp", "w") as f:
          json.dump(keep, f)
        os.replace(subset + ".tmp", subset)
      c.data.paths = (subset,)
    last = i == len(stages) - 1
    stage_dir = workdir if last else os.path.join(workdir, "stages", name)
    c.init_from = previous or config.init_from
    plan.append((name, c, stage_dir))
    previous = stage_dir
  return plan


def run(config: ml_collections.ConfigDict, workdir: str, *, export: bool = True) -> dict[str, Any]:
  """The whole job; returns (and writes) the summary."""
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  times: dict[str, float] = {}

  def timed(name: str, fn, *args, **kw):
    t = time.time()
    out = fn(*args, **kw)
    times[name] = time.time() - t
    return out

  from fusion_jax.train import preflight
  # The config before minutes of synthesis (its data is filled in by prepare), then each stage
  # with its data; a stage after the first starts from the previous one's (future) workdir.
  preflight.require(config, workdir, data=False, init_from=False)
  config = timed("data+tokenizer", prepare, config, workdir)
  plan = stage_plan(config, workdir)
  problems = [p for i, (_, c, d) in enumerate(plan)
              for p in preflight.check(c, d, init_from=i == 0)]
  if problems:
    raise preflight.ConfigError(problems)
  os.makedirs(workdir, exist_ok=True)
  from fusion_jax.train.loop import train
  stage_runs = []
  for i, (name, stage_config, stage_dir) in enumerate(plan):
    _say(f"stage {i + 1}/{len(plan)} '{name}': {stage_config.num_steps} steps of batch "
         f"{stage_config.global_batch} on {stage_config.data.paths[0]} in {stage_dir}"
         + (f", starting from {stage_config.init_from}" if stage_config.init_from else ""))
    train_summary = timed(f"train:{name}", train, stage_config, stage_dir)
    stage_runs.append({"stage": name, "workdir": stage_dir,
                       **{k: train_summary.get(k) for k in ("step", "num_steps", "resumed_from",
                                                           "checkpoint_step", "nonfinite_total")}})
    if train_summary.get("preempted"):
      _say("preempted: checkpoint saved; rerun the same command to continue")
      return {"preempted": True, "train": train_summary}
    left = sum(int(c.num_steps) for _, c, _ in plan[i + 1:])
    if left:
      # This stage's time per step (compile included) for the later stages, plus eval (~1 min).
      per_step = times[f"train:{name}"] / max(1, int(stage_config.num_steps))
      _say(f"job ETA: ~{(left * per_step + 60) / 60:.0f} min more ({left} steps at "
           f"{per_step:.2f} s/step, then eval, sample answers, export); "
           f"{(time.time() - t0) / 60:.1f} min so far")

  from fusion_jax.eval.evaluate import run_eval
  ev = timed("eval", run_eval, workdir, split=config.eval.split,
             batch_size=int(config.eval.batch_size))
  samples = timed("samples", sample_answers, workdir, ev["data"])
  from fusion_jax import job_plots
  job_curve = job_plots.plot_job_loss([(n, d) for n, _, d in plan],
                                      os.path.join(workdir, "job_loss_curve.png"))
  targets_plot = job_plots.plot_targets(
      ev["categories"], {c: target_of(c, r["chance"]) for c, r in ev["categories"].items()},
      os.path.join(workdir, f"eval_{config.eval.split}_targets.png"))
  from fusion_jax.convert import export_torch as export_lib
  from fusion_jax.train.fusion_task import fusion_config_from
  # A folder name the authors' loader routes to the right class (torch_fusion_phi here).
  export_dir = os.path.join(workdir, export_lib.torch_dir_name(fusion_config_from(config.model)))
  export_note = None
  if export:
    if os.path.isdir(export_dir):
      import shutil
      shutil.rmtree(export_dir)
    # The smoke model (32 px tower, 4 tower layers, 4 interaction heads) is too small for the
    # authors' hard-coded shapes: export it anyway (exact weights that import_torch reads back)
    # and say so in the summary and the export's README.md.
    problems = timed("export", export_lib.export_torch, workdir, export_dir,
                     allow_incompatible=True, log=_say)
    if problems:
      export_note = ("exported with --allow_incompatible; the authors' code cannot run it: "
                     + "; ".join(problems))
  total = time.time() - t0
  last = train_summary.get("last") or {}
  summary = {
      "workdir": workdir, "wall_time_s": total, "stage_time_s": times,
      "train": stage_runs[-1], "stages": stage_runs,
      "final_metrics": last, "eval": ev["categories"],
      "targets": [{"category": c, "target": t, "met": m} for c, t, m in
                  check_targets(ev["categories"])],
      "samples": samples, "export_note": export_note,
      "files": {"summary": os.path.join(workdir, "summary.json"),
                "base_model": config.init_from if config.get("base") and config.base.get("llm")
                else None,
                "checkpoints": train_summary.get("checkpoint_dir"),
                "job_loss_curve": job_curve,
                **{f"loss_curve:{r['stage']}": os.path.join(r["workdir"], "loss_curve.png")
                   for r in stage_runs},
                **{f"metrics:{r['stage']}": os.path.join(r["workdir"], "metrics.jsonl")
                   for r in stage_runs},
                "tensorboard": os.path.join(workdir, "tb"),
                "eval": os.path.join(workdir, f"eval_{config.eval.split}.json"),
                "eval_plot": os.path.join(workdir, f"eval_{config.eval.split}.png"),
                "eval_targets_plot": targets_plot,
                "export_torch": export_dir if export else None},
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  print(format_summary(summary), flush=True)
  return summary


def sample_answers(workdir: str, heldout: str) -> list[dict[str, str]]:
  """The trained model's greedy answer to the first held-out question of each category."""
  from fusion_jax.eval.closed_qa import iter_records
  from fusion_jax.infer.generate import answer_run, first_questions, question_text
  firsts: dict[str, dict[str, Any]] = {}
  for rec in iter_records(heldout):
    firsts.setdefault(str(rec.get("category", "")), rec)
  prompts, refs = first_questions(list(firsts.values()), len(firsts))
  answers, _ = answer_run(workdir, prompts, image_root=os.path.dirname(heldout),
                          max_new_tokens=16)
  return [{"category": p.get("category", ""), "question": question_text(p), "answer": a,
           "reference": r} for p, a, r in zip(prompts, answers, refs)]


def _short(text: str, n: int) -> str:
  """`text` on one line, cut to n characters."""
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n - 3] + "..."


def format_summary(s: dict[str, Any]) -> str:
  lines = ["", "=" * 72, "FUSION main job summary", "=" * 72]
  lines.append(f"wall time {s['wall_time_s']:.0f} s  (" + ", ".join(
      f"{k} {v:.0f} s" for k, v in s["stage_time_s"].items()) + ")")
  m = s["final_metrics"]
  if m:
    parts = [f"{k} {m[k]:.4f}" for k in ("loss", "ce", "text_map", "vision_map") if k in m]
    lines.append(f"step {s['train']['step']}: " + ", ".join(parts))
  for st in s.get("stages", []):
    lines.append(f"stage {st['stage']}: {st['step']} steps in {st['workdir']}")
  lines.append("")
  lines.append(f"{'category':<20} {'accuracy':>8} {'chance':>7} {'target':>8} {'met':>4} "
               f"{'n':>5}")
  met = {t["category"]: t for t in s["targets"]}
  for cat, r in s["eval"].items():
    t = met.get(cat)
    lines.append(f"{cat:<20} {r['accuracy']:>8.3f} {r['chance']:>7.3f} "
                 f"{t['target'] if t else '':>8} {('yes' if t['met'] else 'NO') if t else '':>4} "
                 f"{r['count']:>5d}")
  unmet = [t["category"] for t in s["targets"] if not t["met"]]
  if unmet:
    lines.append(f"{len(unmet)} of {len(s['targets'])} targets not met: {', '.join(unmet)} "
                 "(README 'Main job' says what limits them)")
  if s.get("samples"):
    lines.append("")
    lines.append("sample answers (greedy, first held-out question per category):")
    for x in s["samples"]:
      lines.append(f"  {x['category']:<20} {_short(x['question'], 56):<56} -> "
                   f"{_short(x['answer'], 30)!r} (reference {_short(x['reference'], 30)!r})")
  lines.append("")
  for k, v in s["files"].items():
    if v:
      lines.append(f"{k:<22} {v}")
  if s.get("export_note"):
    lines.append(f"note: {s['export_note']}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  logging.set_verbosity(logging.INFO)
  # Progress lines come from the trainer's logger; orbax's INFO chatter is noise here.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
  from fusion_jax.train import preflight
  try:
    summary = run(FLAGS.config, FLAGS.workdir, export=FLAGS.export)
  except preflight.ConfigError as e:
    sys.exit(preflight.report(e, "fusion_jax.run", FLAGS.verbose))
  sys.exit(0 if summary else 1)


if __name__ == "__main__":
  app.run(main)
