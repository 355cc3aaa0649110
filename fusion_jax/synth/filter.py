"""Filter stage: reject inconsistent, ambiguous or degenerate items, counting the reasons.

Per item (`check_item`, first failing reason wins, in this order):
  degenerate       empty / malformed turns, answer not among its candidates, repeated question,
                   blank image
  clipped          an object or sign box leaves its panel
  occlusion        two boxes in a panel are closer than MIN_GAP (overlap = hidden object)
  ambiguous        a referring expression matches != 1 object, or the pixels support no single
                   answer (e.g. a relation with no dominant axis, tied counts)
  not_visible      per panel and colour, the number of blobs in the pixels differs from the
                   number of objects described (something drawn too small, merged or missing)
  text_unreadable  a sign's ink is missing or shorter than measure.MIN_TEXT_PX pixels
  answer_mismatch  a closed answer differs from the value measured from the pixels
Items without a structured scene (text-only user backends) get the structural checks only.

Dataset level: `dedup` drops items whose caption and conversation repeat an earlier item's,
and `balance` caps answer frequencies (rule below) so no category can be solved by always
giving the majority answer.

Balance rule: records are grouped by (category, answer_type, candidates) of their first closed
question; in a group of n records over |C| candidates no answer may occur more than
ceil(BALANCE_RATIO * n / |C|) times (BALANCE_RATIO = 1.25), re-applied until stable, dropping
the highest-index surplus. Hence the majority-answer rate of every group is at most
1.25 / |C| + 1 / n.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fusion_jax.synth import measure as M
from fusion_jax.synth import scene as S
from fusion_jax.synth.records import ANSWER_TYPES, Turn

REASONS = ("degenerate", "clipped", "occlusion", "ambiguous", "not_visible", "text_unreadable",
           "answer_mismatch", "duplicate", "balance")
MIN_GAP = 0.02        # min distance between two boxes (fraction of the image side)
MIN_OBJECT_R = 0.04   # smaller objects are rejected as not visible
BALANCE_RATIO = 1.25


def _structural(turns: Sequence[Turn], image: np.ndarray | None) -> str | None:
  if not turns:
    return "degenerate"
  questions = set()
  for t in turns:
    if not isinstance(t.question, str) or not isinstance(t.answer, str):
      return "degenerate"
    if not t.question.strip() or not t.answer.strip() or t.question in questions:
      return "degenerate"
    questions.add(t.question)
    if t.qa is not None:
      cands = t.qa.get("candidates")
      if (not isinstance(cands, (list, tuple)) or len(cands) < 2 or len(set(cands)) != len(cands)
          or t.qa.get("answer") != t.answer or t.answer not in cands
          or t.qa.get("answer_type") not in ANSWER_TYPES):
        return "degenerate"
  if image is not None:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      return "degenerate"
    if int(image.max()) == int(image.min()):
      return "degenerate"
  return None


def _inside(box, region) -> bool:
  return (box[0] >= region[0] - 1e-6 and box[1] >= region[1] - 1e-6
          and box[2] <= region[2] + 1e-6 and box[3] <= region[3] + 1e-6)


def _gap(a, b) -> float:
  """Distance between two boxes (negative when they overlap)."""
  dx = max(a[0] - b[2], b[0] - a[2])
  dy = max(a[1] - b[3], b[1] - a[3])
  return max(dx, dy)


def _geometry(desc: S.Description) -> str | None:
  for p in desc.panels:
    boxes = [o.bbox for o in p.objects] + [s.bbox for s in p.signs]
    if any(not _inside(b, p.region) for b in boxes):
      return "clipped"
    for i in range(len(boxes)):
      for j in range(i + 1, len(boxes)):
        if _gap(boxes[i], boxes[j]) < MIN_GAP:
          return "occlusion"
    if any(o.r < MIN_OBJECT_R for o in p.objects):
      return "not_visible"
  return None


def _matches(o: S.Obj, ref: Mapping[str, str]) -> bool:
  return all(getattr(o, k) == v for k, v in ref.items())


def _ambiguous(desc: S.Description, turns: Sequence[Turn]) -> bool:
  for t in turns:
    if t.check is None:
      continue
    objs = desc.panels[t.check.get("panel", 0)].objects
    for ref in t.check.get("refs", ()):
      if sum(_matches(o, ref) for o in objs) != 1:
        return True
    inner = t.check.get("inner", t.check)
    shape = inner.get("only_shape")
    if shape is not None and any(o.color == inner["color"] and o.shape != shape for o in objs):
      return True
  return False


def _visible(desc: S.Description, an: M.Analysis) -> bool:
  for p in desc.panels:
    want = collections.Counter(o.color for o in p.objects)
    got = an.counts(p.region)
    if any(got[c] != want.get(c, 0) for c in S.COLORS):
      return False
  return True


def check_item(desc: S.Description, turns: Sequence[Turn], image: np.ndarray | None
               ) -> str | None:
  """First reason (see module docstring) to reject an item, or None to keep it."""
  reason = _structural(turns, image)
  if reason or not desc.panels:
    return reason
  reason = _geometry(desc)
  if reason:
    return reason
  if _ambiguous(desc, turns):
    return "ambiguous"
  if image is None:
    return None
  an = M.Analysis(image)
  if not _visible(desc, an):
    return "not_visible"
  for p in desc.panels:
    for s in p.signs:
      if M.text_height_px(image, s.bbox) < M.MIN_TEXT_PX:
        return "text_unreadable"
  for t in turns:
    if t.check is None or t.qa is None:
      continue
    got = M.measure(t.check, an, image, desc)
    if got is None:
      continue
    if got == M.AMBIGUOUS:
      return "ambiguous"
    if got != t.answer:
      return "answer_mismatch"
  return None


def dedup_key(record: Mapping[str, Any]) -> str:
  """Items repeating an earlier item's category, caption and conversation are duplicates."""
  payload = json.dumps([record["category"], record.get("caption", ""), record["conversations"]],
                       sort_keys=True)
  return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def primary_qa(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
  """The first closed question's qa entry (what `balance` groups by), or None."""
  return next((q for q in record.get("qa", ()) if q is not None), None)


def group_key(record: Mapping[str, Any]) -> tuple | None:
  q = primary_qa(record)
  if q is None:
    return None
  return (record["category"], q["answer_type"], tuple(q["candidates"]))


def balance(records: Sequence[Mapping[str, Any]], ratio: float = BALANCE_RATIO
            ) -> tuple[list[Mapping[str, Any]], int]:
  """Apply the balance rule (module docstring). Records must be in index order.

  Returns (kept records in input order, number dropped).
  """
  groups: dict[tuple, list[int]] = collections.defaultdict(list)
  for i, r in enumerate(records):
    k = group_key(r)
    if k is not None:
      groups[k].append(i)
  drop: set[int] = set()
  for key, idx in groups.items():
    n_cands = len(key[2])
    alive = list(idx)
    while True:
      cap = max(1, math.ceil(ratio * len(alive) / n_cands))
      seen: collections.Counter = collections.Counter()
      keep = []
      for i in alive:
        a = primary_qa(records[i])["answer"]
        seen[a] += 1
        if seen[a] <= cap:
          keep.append(i)
      if len(keep) == len(alive):
        break
      drop.update(set(alive) - set(keep))
      alive = keep
  return [r for i, r in enumerate(records) if i not in drop], len(drop)


def dedup(records: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
  """Keep the first record of each dedup_key; returns (kept, number dropped)."""
  seen: set[str] = set()
  out = []
  dropped = 0
  for r in records:
    k = dedup_key(r)
    if k in seen:
      dropped += 1
      continue
    seen.add(k)
    out.append(r)
  return out, dropped


class ProceduralFilter:
  """Default `Filter`: `check_item` (no configuration)."""

  def check(self, desc: S.Description, turns: Sequence[Turn], image: np.ndarray | None
            ) -> str | None:
    return check_item(desc, turns, image)
