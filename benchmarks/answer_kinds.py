r"""Held-out accuracy by kind of question: what a run answers and what it answers by rote.

  python benchmarks/answer_kinds.py --workdir runs/smoke [--data FILE.json] [--out FILE.json]

The eval's table is per category, and a category mixes kinds of question (SynthScene: the
background pattern or a named object's shape; SynthConvShort: colour, count, shape, relation,
yes/no). This scores a run's held-out closed questions with the eval's own scorer
(fusion_jax.eval.closed_qa) and prints, per (category, answer kind) and per kind over all
categories: accuracy, n, chance and the most frequent predicted answer with its share, so a
constant answer shows as a share near 1. --data defaults to the run's held-out file.
Not part of CI (~30 s on 2 cores for the main job's 600 held-out records).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402

PROG = "python benchmarks/answer_kinds.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "training workdir (the main job's)", flag_values=fv,
                      required=True)
  flags.DEFINE_string("data", "", "records to score (default: <image root>/heldout.json)",
                      flag_values=fv)
  flags.DEFINE_string("out", "", "also write the table as JSON here", flag_values=fv)


def rows_by_kind(questions, predicted) -> list[dict]:
  """[{category, kind, n, accuracy, chance, top, top_share}] per (category, kind), then per
  kind over all categories (category '*'): fusion_jax.eval.closed_qa.group_accuracy."""
  from fusion_jax.eval.closed_qa import group_accuracy
  out = []
  for key in (lambda q: (q.category, q.answer_type), lambda q: ("*", q.answer_type)):
    for (cat, kind), r in group_accuracy(questions, predicted, key=key, total=None).items():
      out.append({"category": cat, "kind": kind, "n": r["count"], "accuracy": r["accuracy"],
                  "chance": r["chance"], "top": r["top"], "top_share": r["top_share"]})
  return out


def main(args) -> int:
  from fusion_jax.eval import closed_qa as cq
  from fusion_jax.infer.load import load_model
  m = load_model(args.workdir)
  data = args.data or os.path.join(m.image_root, "heldout.json")
  with open(data) as f:
    records = json.load(f)
  questions = cq.closed_questions(records)
  examples, owners, _ = cq.build_examples(
      records, questions, m.tokenizer, template=m.cfg.template, q=m.q,
      num_image_tokens=m.cfg.num_image_tokens, seq_len=m.seq_len,
      max_questions=m.max_questions, max_instruct_len=m.cfg.max_instruct_len)
  scores = cq.score_examples(m.params, m.cfg, examples,
                             cq.image_loader(records, os.path.dirname(data),
                                             m.cfg.vision.image_size), batch_size=32)
  rows = rows_by_kind(questions, cq.best_candidates(questions, scores, owners))
  print(f"{m.name} on {data}")
  print(f"{'category':<20} {'kind':<11} {'n':>4} {'accuracy':>8} {'chance':>7}  most frequent answer")
  for r in rows:
    print(f"{r['category']:<20} {r['kind']:<11} {r['n']:>4} {r['accuracy']:>8.3f} "
          f"{r['chance']:>7.3f}  {r['top']!r} ({r['top_share']:.0%})")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"workdir": m.path, "data": data, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
