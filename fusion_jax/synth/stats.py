"""Dataset statistics: counts, filter rejections, chance level and majority-answer rate.

Per category, over its closed questions:
  chance                mean over questions of 1 / len(candidates) (uniform guessing)
  majority_rate         accuracy of always giving the most frequent answer of each question
                        group (same answer_type and candidates), all closed turns
  primary_majority_rate the same over each record's first closed question, the turn `balance`
                        equalises (filter.py states the rule and its bound)
  widest_group          the most uneven answer group over every closed question, with first
                        and later closed turns apart (later turns are balanced by construction
                        only): its most frequent answer's share minus 1 / |candidates|
A category can be "solved" by a constant answer only if majority_rate is far above chance.
"""
from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

from fusion_jax.synth import filter as F


WIDEST_MIN_N = 30  # smaller groups are too noisy to call uneven


def _group(q: Mapping[str, Any]) -> str:
  return f"{q['answer_type']}|{','.join(q['candidates'])}"


def widest_group(records: Sequence[Mapping[str, Any]], min_n: int = WIDEST_MIN_N
                 ) -> dict[str, Any] | None:
  """The (answer type, candidates, first / later closed turn) group of at least min_n questions
  whose most frequent answer exceeds 1 / |candidates| the most, or None."""
  groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in records:
    closed = [q for q in r.get("qa", ()) if q is not None]
    for i, q in enumerate(closed):
      groups[f"{_group(q)}|{'first' if i == 0 else 'later'}"][q["answer"]] += 1
  best = None
  for g, c in sorted(groups.items()):
    n = sum(c.values())
    if n < min_n:
      continue
    answer, top = c.most_common(1)[0]
    uniform = 1.0 / len(g.split("|")[1].split(","))
    excess = top / n - uniform
    if best is None or excess > best["excess"]:
      best = {"group": g, "n": n, "answer": answer, "share": round(top / n, 4),
              "uniform": round(uniform, 4), "excess": round(excess, 4)}
  return best


def answer_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """chance, majority_rate, primary_majority_rate and per-group answer counts of records."""
  groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  primary: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  inv_c = []
  for r in records:
    for q in r.get("qa", ()):
      if q is None:
        continue
      groups[_group(q)][q["answer"]] += 1
      inv_c.append(1.0 / len(q["candidates"]))
    p = F.primary_qa(r)
    if p is not None:
      primary[_group(p)][p["answer"]] += 1
  n = len(inv_c)
  n_primary = sum(sum(c.values()) for c in primary.values())
  out: dict[str, Any] = {
      "closed_questions": n,
      "chance": round(sum(inv_c) / n, 4) if n else None,
      "majority_rate": round(sum(max(c.values()) for c in groups.values()) / n, 4) if n else None,
      "primary_majority_rate": (round(sum(max(c.values()) for c in primary.values()) / n_primary,
                                      4) if n_primary else None),
      "primary_groups": {},
      "answer_counts": {g: dict(sorted(c.items())) for g, c in sorted(groups.items())},
      "widest_group": widest_group(records),
  }
  for g, c in sorted(primary.items()):
    total = sum(c.values())
    n_cands = len(g.split("|", 1)[1].split(","))
    out["primary_groups"][g] = {
        "n": total, "max_share": round(max(c.values()) / total, 4),
        "bound": round(F.BALANCE_RATIO / n_cands + 1.0 / total, 4)}
  return out


def compute_stats(cfg: Any, train: Sequence[Mapping], heldout: Sequence[Mapping], generated: int,
                  rejected: Mapping[str, int], rejected_by_cat: Mapping[str, Mapping[str, int]],
                  quotas: Mapping[str, int]) -> dict[str, Any]:
  """The stats.json dictionary (deterministic: no timings)."""
  cats: dict[str, Any] = {}
  for cat in cfg.categories:
    tr = [r for r in train if r["category"] == cat]
    ho = [r for r in heldout if r["category"] == cat]
    s = answer_stats(tr + ho)
    s.update({"records": len(tr) + len(ho), "train": len(tr), "heldout": len(ho),
              "quota": quotas[cat], "heldout_chance": answer_stats(ho)["chance"],
              "rejected": dict(sorted(rejected_by_cat.get(cat, {}).items()))})
    cats[cat] = s
  return {
      "config": {"num": cfg.num, "seed": cfg.seed, "size": cfg.size,
                 "categories": list(cfg.categories), "heldout_fraction": cfg.heldout_fraction,
                 "image_format": cfg.image_format, "backends": cfg.backends.to_dict()},
      "generated": generated,
      "records": len(train) + len(heldout),
      "train": len(train),
      "heldout": len(heldout),
      "rejected": {k: int(rejected.get(k, 0)) for k in F.REASONS},
      # Items that passed everything but exceeded their category's quota.
      "unused_surplus": generated - sum(rejected.values()) - len(train) - len(heldout),
      "balance_rule": (f"per (category, answer_type, candidates) group of first closed "
                       f"questions: count of each answer <= ceil({F.BALANCE_RATIO} * n / "
                       f"|candidates|)"),
      "categories": cats,
  }


def format_stats(stats: Mapping[str, Any]) -> str:
  """Human-readable summary table."""
  lines = [f"synthesized {stats['records']} records ({stats['train']} train, "
           f"{stats['heldout']} held-out) from {stats['generated']} generated items",
           "rejected: " + ", ".join(f"{k} {v}" for k, v in stats["rejected"].items() if v)
           if any(stats["rejected"].values()) else "rejected: none",
           "",
           f"{'category':<20}{'records':>8}{'heldout':>8}{'closed':>8}{'chance':>8}"
           f"{'majority':>9}{'primary':>9}{'widest':>8}  rejected"]
  fmt = lambda v: f"{v:.3f}" if v is not None else "-"
  for cat, s in stats["categories"].items():
    rej = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "-"
    wide = s.get("widest_group")
    lines.append(f"{cat:<20}{s['records']:>8}{s['heldout']:>8}{s['closed_questions']:>8}"
                 f"{fmt(s['chance']):>8}{fmt(s['majority_rate']):>9}"
                 f"{fmt(s['primary_majority_rate']):>9}{fmt(wide and wide['excess']):>8}  {rej}")
  lines.append("")
  lines.append("chance = mean 1/|candidates|; majority = accuracy of always answering each "
               "question group's most frequent answer; primary = same on first closed question "
               "(balanced: " + stats["balance_rule"] + "); widest = the most uneven group "
               f"(answer type and candidates, first / later closed turn, >= {WIDEST_MIN_N} "
               "questions): its top answer's share minus 1/|candidates|")
  worst = max(((c, s["widest_group"]) for c, s in stats["categories"].items()
               if s.get("widest_group")), key=lambda cw: cw[1]["excess"], default=None)
  if worst:
    c, w = worst
    kind, _, turn = w["group"].split("|")
    lines.append(f"widest overall: {c}, {kind} ({turn} turns): {w['answer']!r} "
                 f"{w['share']:.3f} of {w['n']} against {w['uniform']:.3f}")
  return "\n".join(lines)
