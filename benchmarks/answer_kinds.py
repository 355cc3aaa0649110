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

import collections
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
  kind over all categories (category '*')."""
  groups = collections.defaultdict(list)
  for q, p in zip(questions, predicted):
    if p is None:
      continue
    for key in ((q.category, q.answer_type), ("*", q.answer_type)):
      groups[key].append((q, p))
  out = []
  for (cat, kind), items in sorted(groups.items(), key=lambda kv: (kv[0][0] == "*", kv[0])):
    preds = collections.Counter(q.candidates[p] for q, p in items)
    top, count = preds.most_common(1)[0]
    out.append({"category": cat, "kind": kind, "n": len(items),
                "accuracy": sum(p == q.answer for q, p in items) / len(items),
                "chance": sum(1 / len(q.candidates) for q, _ in items) / len(items),
                "top": top, "top_share": count / len(items)})
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
  best: dict[int, tuple[float, int]] = {}
  for (qi, ci), s in zip(owners, scores):
    if qi not in best or s > best[qi][0]:
      best[qi] = (float(s), ci)
  rows = rows_by_kind(questions, [best[i][1] if i in best else None
                                  for i in range(len(questions))])
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
