"""Evaluate a FUSION training run (its newest checkpoint) on a split of its dataset."""
from __future__ import annotations

import json
import os
import sys
import time


def split_path(config, split: str) -> str:
  """<directory of the run's first training file>/<split>.json."""
  paths = list(config.data.get("paths") or ())
  if not paths:
    raise ValueError("the run's config.data.paths is empty; pass --data FILE")
  return os.path.join(os.path.dirname(paths[0]), f"{split}.json")


def run_eval(workdir: str, *, split: str = "heldout", data: str = "", step: int | None = None,
             batch_size: int = 32, seq_len: int | None = None, write: bool = True) -> dict:
  """Evaluates a run; returns the report and writes eval_<split>.json / .png in the workdir.

  seq_len: scoring length (default: the run's data.seq_len; an earlier stage trained shorter
    sequences than the final evaluation uses). write=False only returns the report.
  """
  from fusion_jax.data.tokenizer import TEMPLATE_PAD_TOKENS, load_tokenizer
  from fusion_jax.eval import closed_qa
  from fusion_jax.train.workdir import load_run

  t0 = time.time()
  params, cfg, config, step = load_run(workdir, step)
  path = data or split_path(config, split)
  records = list(closed_qa.iter_records(path))
  tok = load_tokenizer(config.data.tokenizer, pad_token=TEMPLATE_PAD_TOKENS[cfg.template])
  d = config.data
  q = int(d.get("eval_q") or max(cfg.query_len))

  def progress(done: int, total: int) -> None:
    print(f"\reval {done}/{total} sequences", end="", file=sys.stderr, flush=True)

  report = closed_qa.evaluate(params, cfg, records, tok, image_root=d.get("image_root", ""),
                              q=q, seq_len=int(seq_len or d.seq_len),
                              max_questions=int(d.max_questions),
                              batch_size=batch_size, progress=progress)
  print(file=sys.stderr)
  out = {"workdir": workdir, "step": step, "data": path, "q": q, "categories": report,
         "wall_time_s": time.time() - t0}
  if write:
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
      json.dump(out, f, indent=2)
    closed_qa.plot_report(report, os.path.join(workdir, f"eval_{split}.png"))
  print(f"{split} accuracy at step {step} ({path}, q={q}):")
  print(closed_qa.format_table(report))
  return out
