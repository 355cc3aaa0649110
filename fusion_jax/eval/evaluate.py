"""Evaluate a FUSION model (a training run's newest or --step checkpoint, or a model dir) on a
split of its dataset or a records file."""
from __future__ import annotations

import json
import os
import sys
import time


def split_path(config, split: str) -> str:
  """<directory of the run's first training file>/<split>.json."""
  from fusion_jax.task.fusion import run_data_config
  paths = list(run_data_config(config).paths)
  if not paths:
    raise ValueError("the run's config.data.paths is empty; pass --data FILE")
  return os.path.join(os.path.dirname(paths[0]), f"{split}.json")


def run_eval(workdir: str, *, split: str = "heldout", data: str = "", step: int | None = None,
             batch_size: int = 32, seq_len: int | None = None, write: bool = True,
             dtype: str | None = None) -> dict:
  """Evaluates a model; returns the report and writes eval_<split>.json / .png in `workdir`.

  The report's "categories" is accuracy per category, "kinds" per kind of answer over all
  categories (colour, shape, spatial, yes_no, ...), each with its most frequent prediction.

  workdir: a training workdir or a model dir (fusion_jax.infer.load); a model dir needs
    `data` (it has no dataset of its own; images resolve relative to the file's directory).
  seq_len: scoring length (default: the run's data.seq_len; an earlier stage trained shorter
    sequences than the final evaluation uses). write=False only returns the report.
  dtype: compute dtype override.
  """
  from fusion_jax.data.sources import iter_records
  from fusion_jax.eval import closed_qa
  from fusion_jax.infer.load import load_model

  t0 = time.time()
  model = load_model(workdir, step=step, dtype=dtype, seq_len=seq_len)
  cfg, params, step, tok, q = model.cfg, model.params, model.step, model.tokenizer, model.q
  if model.config is None and not data:
    raise ValueError(f"{workdir} is a model dir: pass --data FILE (records to evaluate)")
  path = data or split_path(model.config, split)
  records = list(iter_records(path))
  image_root = model.image_root if model.config is not None else os.path.dirname(path)

  def progress(done: int, total: int) -> None:
    print(f"\reval {done}/{total} sequences", end="", file=sys.stderr, flush=True)

  both = closed_qa.evaluate_report(params, cfg, records, tok, image_root=image_root,
                                   q=q, seq_len=int(seq_len or model.seq_len),
                                   max_questions=model.max_questions,
                                   batch_size=batch_size, progress=progress)
  print(file=sys.stderr)
  report = both["categories"]
  out = {"workdir": workdir, "step": step, "data": path, "q": q, "categories": report,
         "kinds": both["kinds"], "wall_time_s": time.time() - t0}
  if write:
    with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
      json.dump(out, f, indent=2)
    closed_qa.plot_report(report, os.path.join(workdir, f"eval_{split}.png"))
  print(f"{'accuracy' if data else split + ' accuracy'} of {model.name} ({path}, q={q}):")
  print(closed_qa.format_table(report))
  print(closed_qa.format_table(both["kinds"], group="answer kind"))
  return out
