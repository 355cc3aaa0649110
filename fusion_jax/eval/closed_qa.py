"""Closed-answer evaluation: score every candidate answer by its log-likelihood, pick the best.

A record's `qa` list (see fusion_jax/synth/records.py) is aligned with its gpt turns; an entry
with `candidates` is a closed question. For question l the model sees the conversation up to
and including user turn l (earlier answers are the ground truth) followed by each candidate as
the answer; the candidate whose tokens (answer + end token) have the highest summed
log-probability is the prediction. Chance level is 1 / len(candidates).

Every scored sequence has the same static shape (seq_len, eval q), so the scorer compiles once.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.data.conversation import encode_conversation
from fusion_jax.data.errors import BadSample
from fusion_jax.data.images import record_images
from fusion_jax.data.layout import layout_sample
from fusion_jax.models import batch_spec, fusion


@dataclasses.dataclass(frozen=True)
class Question:
  """One closed question: which record, which answer turn, candidates and the right index."""
  record_index: int
  turn: int
  category: str
  answer_type: str
  candidates: tuple[str, ...]
  answer: int


def closed_questions(records: Sequence[Mapping[str, Any]]) -> list[Question]:
  """Every closed question of `records` (entries of `qa` with a candidate set)."""
  out = []
  for i, rec in enumerate(records):
    for turn, qa in enumerate(rec.get("qa") or ()):
      if not qa or not qa.get("candidates"):
        continue
      cands = tuple(str(c) for c in qa["candidates"])
      if qa["answer"] not in cands:
        raise ValueError(f"record {rec.get('id', i)}: answer {qa['answer']!r} of turn {turn} is "
                         f"not among its candidates {cands}")
      out.append(Question(i, turn, str(rec.get("category", "unknown")),
                          str(qa.get("answer_type", "")), cands, cands.index(qa["answer"])))
  return out


def _candidate_record(rec: Mapping[str, Any], turn: int, answer: str) -> dict[str, Any]:
  """The conversation up to user turn `turn`, answered with `answer`."""
  conv = list(rec["conversations"])
  # Turns alternate human/gpt; a leading gpt turn is dropped by the encoder like the authors'.
  start = 1 if conv and conv[0]["from"] in ("gpt", "assistant") else 0
  prefix = conv[start:start + 2 * turn + 1]
  return {**rec, "conversations": prefix + [{"from": "gpt", "value": answer}]}


def _only_last_answer(enc) -> None:
  """Keep supervision on the last answer only (the candidate being scored)."""
  last = max(s.turn for s in enc.segments)
  for s in enc.segments:
    if s.turn != last:
      s.supervised = False


def build_examples(records: Sequence[Mapping[str, Any]], questions: Sequence[Question],
                   tokenizer, *, template: str, q: int, num_image_tokens: int, seq_len: int,
                   max_questions: int, max_instruct_len: int
                   ) -> tuple[list[dict[str, np.ndarray]], list[tuple[int, int]], list[int]]:
  """One laid-out example per (question, candidate).

  Returns (examples, owners, skipped): owners[i] = (question index, candidate index) of
  examples[i]; `skipped` lists the questions that do not fit (the scored answer would be cut
  by seq_len or max_questions): they are reported, never silently dropped. Examples carry the
  record index under `record_index` (images are attached per batch).
  """
  examples, owners, skipped = [], [], []
  for qi, qn in enumerate(questions):
    rec = records[qn.record_index]
    laid = []
    for cand in qn.candidates:
      enc = encode_conversation(_candidate_record(rec, qn.turn, cand), tokenizer, template,
                                source=str(rec.get("id", qn.record_index)))
      _only_last_answer(enc)
      try:
        ex = layout_sample(enc, q=q, num_image_tokens=num_image_tokens, seq_len=seq_len,
                           max_questions=max_questions, max_instruct_len=max_instruct_len,
                           pad_id=tokenizer.pad_id)
      except BadSample:
        break
      n_answer = sum(s.ids.size for s in enc.segments if s.supervised)
      if int((ex["labels"] >= 0).sum()) != n_answer:  # answer partly cut off
        break
      ex["record_index"] = np.asarray(qn.record_index, np.int32)
      laid.append(ex)
    if len(laid) != len(qn.candidates):
      skipped.append(qi)
      continue
    examples += laid
    owners += [(qi, ci) for ci in range(len(laid))]
  return examples, owners, skipped


def make_scorer(cfg: fusion.FusionConfig
                ) -> Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]:
  """Jitted (params, batch) -> ((B,) summed log-probability of each example's labels, (B,)
  whether every label is the greedy token); one full forward, interaction layers included."""

  @jax.jit
  def score(params, batch):
    logits, _ = fusion.apply(params, batch, cfg, train=False)
    logits = logits[:, :-1].astype(jnp.float32)
    labels = batch["labels"][:, 1:]
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
    greedy = jnp.argmax(logits, -1) == safe
    return jnp.sum(jnp.where(valid, logp, 0.0), -1), jnp.all(greedy | ~valid, -1)

  return score


def score_examples(params: Any, cfg: fusion.FusionConfig, examples: Sequence[dict[str, np.ndarray]],
                   image_of: Callable[[int], np.ndarray], *, batch_size: int,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Scores all examples in fixed-size batches (the last one padded by repetition)."""
  scorer = make_scorer(cfg)
  out = np.zeros((len(examples),), np.float64)
  cache: dict[int, np.ndarray] = {}
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    batch = batch_spec.stack_examples(chunk)  # record_index is not a batch key
    imgs = []
    for ex in chunk:
      r = int(ex["record_index"])
      if r not in cache:
        if len(cache) > 4 * batch_size:
          cache.clear()
        cache[r] = image_of(r)
      imgs.append(cache[r])
    batch["images"] = np.stack(imgs)[:, None]  # (B, P=1, 5, H, W, 3)
    out[start:start + n] = np.asarray(scorer(params, batch)[0])[:n]
    if progress:
      progress(min(start + batch_size, len(examples)), len(examples))
  return out


def image_loader(records: Sequence[Mapping[str, Any]], image_root: str, size: int
                 ) -> Callable[[int], np.ndarray]:
  """record index -> uint8 (5, S, S, 3) static_hd crops (zeros for text-only records)."""

  def load(i: int) -> np.ndarray:
    return record_images(records[i], size, image_root=image_root,
                         source=str(records[i].get("id")))

  return load


def best_candidates(questions: Sequence[Question], scores: np.ndarray,
                    owners: Sequence[tuple[int, int]]) -> list[int | None]:
  """Per question the index of its highest-scoring candidate (None: never scored)."""
  best: dict[int, tuple[float, int]] = {}
  for (qi, ci), s in zip(owners, scores):
    if qi not in best or s > best[qi][0]:
      best[qi] = (float(s), ci)
  return [best[i][1] if i in best else None for i in range(len(questions))]


def group_accuracy(questions: Sequence[Question], predicted: Sequence[int | None],
                   skipped: Sequence[int] = (), key: Callable[[Question], Any] | None = None,
                   total: str | None = "all") -> dict[Any, dict[str, Any]]:
  """Per group key(question) (default: its category) and `total` (None: no total row):
  accuracy, chance level, count, skipped (too long) questions and the most frequent prediction
  (`top`, its share `top_share`: a constant answer shows as a share near 1). predicted: the
  chosen candidate index per question (None: not scored)."""
  key = key or (lambda q: q.category)
  per: dict[Any, dict[str, Any]] = collections.defaultdict(
      lambda: {"correct": 0, "count": 0, "chance_sum": 0.0, "skipped": 0,
               "predicted": collections.Counter()})
  groups = lambda q: (key(q),) + ((total,) if total is not None else ())  # noqa: E731
  for qi in skipped:
    for g in groups(questions[qi]):
      per[g]["skipped"] += 1
  for qn, p in zip(questions, predicted):
    if p is None:
      continue
    for g in groups(qn):
      row = per[g]
      row["count"] += 1
      row["correct"] += int(p == qn.answer)
      row["chance_sum"] += 1.0 / len(qn.candidates)
      row["predicted"][qn.candidates[p]] += 1
  report = {}
  for g, row in sorted(per.items(), key=lambda kv: (kv[0] == total, kv[0])):
    count = row["count"]
    top, top_n = (row["predicted"].most_common(1) or [("", 0)])[0]
    report[g] = {"accuracy": row["correct"] / max(count, 1),
                 "chance": row["chance_sum"] / max(count, 1), "count": count,
                 "skipped": row["skipped"], "top": top, "top_share": top_n / max(count, 1)}
  return report


def summarize(questions: Sequence[Question], scores: np.ndarray,
              owners: Sequence[tuple[int, int]], skipped: Sequence[int] = (),
              by: str = "category") -> dict[str, Any]:
  """`group_accuracy` of the best-scoring candidates per group and 'all'. by: the Question
  field to group on, "category" or "answer_type" (the kind of answer: colour, shape, spatial,
  yes_no, ...; a category mixes several)."""
  return group_accuracy(questions, best_candidates(questions, scores, owners), skipped,
                        key=lambda q: getattr(q, by))


def evaluate_report(params: Any, cfg: fusion.FusionConfig, records: Sequence[Mapping[str, Any]],
                    tokenizer, *, image_root: str, q: int, seq_len: int, max_questions: int,
                    batch_size: int = 16, progress: Callable[[int, int], None] | None = None
                    ) -> dict[str, dict[str, Any]]:
  """Closed-answer accuracy of `params` on `records`, scored once and summarised two ways:
  {"categories": per category, "kinds": per answer kind over all categories} (`summarize`)."""
  questions = closed_questions(records)
  if not questions:
    raise ValueError("eval: no closed-answer questions (records need 'qa' entries with "
                     "'candidates'); is this a synthesized split?")
  examples, owners, skipped = build_examples(
      records, questions, tokenizer, template=cfg.template, q=q,
      num_image_tokens=cfg.num_image_tokens, seq_len=seq_len, max_questions=max_questions,
      max_instruct_len=cfg.max_instruct_len)
  if not examples:
    raise ValueError(f"eval: none of the {len(questions)} questions fits seq_len={seq_len} / "
                     f"max_questions={max_questions}; raise them")
  scores = score_examples(params, cfg, examples,
                          image_loader(records, image_root, cfg.vision.image_size),
                          batch_size=batch_size, progress=progress)
  return {by: summarize(questions, scores, owners, skipped, by=field)
          for by, field in (("categories", "category"), ("kinds", "answer_type"))}


def evaluate(params: Any, cfg: fusion.FusionConfig, records: Sequence[Mapping[str, Any]],
             tokenizer, **kw: Any) -> dict[str, Any]:
  """Per-category closed-answer accuracy of `params` on `records` (evaluate_report's
  "categories"; keyword arguments as there)."""
  return evaluate_report(params, cfg, records, tokenizer, **kw)["categories"]


def format_table(report: Mapping[str, Mapping[str, Any]], group: str = "category") -> str:
  """A fixed-width text table of a report (`group` names its first column)."""
  lines = [f"{group:<20} {'accuracy':>8} {'chance':>7} {'x chance':>8} {'n':>5} "
           f"{'skipped':>7}  most frequent answer"]
  for cat, r in report.items():
    ratio = r["accuracy"] / r["chance"] if r["chance"] else float("nan")
    top = f"{r['top']!r} ({r['top_share']:.0%})" if "top" in r else ""
    lines.append(f"{cat:<20} {r['accuracy']:>8.3f} {r['chance']:>7.3f} {ratio:>8.2f} "
                 f"{r['count']:>5d} {r.get('skipped', 0):>7d}  {top}")
  return "\n".join(lines)


def plot_report(report: Mapping[str, Mapping[str, float]], path: str) -> None:
  """Bar chart of accuracy per category with chance level marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cats = list(report)
  acc = [report[c]["accuracy"] for c in cats]
  chance = [report[c]["chance"] for c in cats]
  fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(cats)), 4))
  xs = np.arange(len(cats))
  ax.bar(xs, acc, color="tab:blue", label="accuracy")
  ax.scatter(xs, chance, color="tab:red", marker="_", s=400, label="chance", zorder=3)
  ax.set_xticks(xs, cats, rotation=40, ha="right")
  ax.set_ylim(0, 1)
  ax.set_ylabel("held-out accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
