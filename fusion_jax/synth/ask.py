"""Ask stage of the procedural backend: Description -> question/answer `Turn`s.

Questions are written from the description only (never from the image), as in FUSION's
pipeline. Several templates per question kind vary the text; answers are canonical short
strings (a palette colour, a digit, yes/no, left/right/above/below, an option letter, a word),
always one of the question kind's fixed candidate set, which the describe stage sampled
uniformly. Each closed turn carries a `check` telling the filter how to verify it from pixels.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from fusion_jax.synth import scene as S
from fusion_jax.synth.categories import ALIGNMENT, CATEGORIES
from fusion_jax.synth.describe import (CHANGES, COUNT_DIFFS, COUNTS, RELATIONS,
                                       background_phrase, panel_clause)
from fusion_jax.synth.records import Turn, closed

YES_NO = ("yes", "no")
LETTERS = ("A", "B", "C", "D")


def _t(rng: np.random.Generator, templates: Sequence[str], **kw: Any) -> str:
  return templates[int(rng.integers(len(templates)))].format(**kw)


def _plural(shape: str) -> str:
  return S.SHAPE_PLURALS[shape]


# ---- question kinds: each returns a Turn for one object / fact of a single-panel scene ----

def _color_turn(q: str, o: S.Obj) -> Turn:
  return Turn(q, o.color, closed(o.color, "color", S.COLORS, "color_of"),
              {"op": "color_of", "bbox": o.bbox, "refs": [{"shape": o.shape}]})


def color_of(rng: np.random.Generator, o: S.Obj) -> Turn:
  return _color_turn(_t(rng, ("What colour is the {s}?", "What color is the {s}?",
                              "Which colour is the {s} in the picture?",
                              "Name the color of the {s}.",
                              "What is the colour of the {s}? Answer with one word."),
                        s=o.shape), o)


def color_of_single(rng: np.random.Generator, o: S.Obj) -> Turn:
  """color_of for a scene with one object (the question need not name its shape)."""
  return _color_turn(_t(rng, ("What colour is the object?", "What color is the shape in the image?",
                              "Which colour is the {s}?", "What is the colour of the {s}?",
                              "Name the color of the object in this picture."), s=o.shape), o)


def shape_of(rng: np.random.Generator, o: S.Obj) -> Turn:
  q = _t(rng, ("What shape is the {c} object?", "Which shape is {c}?",
               "What is the shape of the {c} object?", "Name the shape of the {c} object."),
         c=o.color)
  return Turn(q, o.shape, closed(o.shape, "shape", S.SHAPES, "shape_of"),
              {"op": "shape_of", "bbox": o.bbox, "refs": [{"color": o.color}]})


def count(rng: np.random.Generator, n: int, color: str, shape: str | None) -> Turn:
  if shape is None:
    q = _t(rng, ("How many {c} objects are there?", "How many {c} shapes can you see?",
                 "Count the {c} objects."), c=color)
  else:
    q = _t(rng, ("How many {c} {p} are there?", "How many {c} {p} are in the image?",
                 "Count the {c} {p}.", "How many {c} {p} can you see?"),
           c=color, p=_plural(shape))
  check = {"op": "count", "color": color, "refs": []}
  if shape is not None:
    check["only_shape"] = shape  # every object of this colour must have this shape
  return Turn(q, str(n), closed(str(n), "count", COUNTS, "count"), check)


def exists(rng: np.random.Generator, color: str, present: bool) -> Turn:
  q = _t(rng, ("Is there a {c} object in the image?", "Do you see anything {c}?",
               "Is any shape {c}?", "Does the picture contain a {c} shape?"), c=color)
  a = "yes" if present else "no"
  return Turn(q, a, closed(a, "yes_no", YES_NO, "exists"), {"op": "exists", "color": color,
                                                            "refs": []})


def relation(rng: np.random.Generator, a: S.Obj, b: S.Obj, rel: str) -> Turn:
  q = _t(rng, ("Is the {a} to the left of, to the right of, above or below the {b}?",
               "Where is the {a} relative to the {b}: left, right, above or below?",
               "Relative to the {b}, where is the {a}? Answer left, right, above or below.",
               "Where is the {a} compared with the {b}? Answer with left, right, above or "
               "below."), a=a.phrase(), b=b.phrase())
  return Turn(q, rel, closed(rel, "spatial", RELATIONS, "relation"),
              {"op": "relation", "a": a.bbox, "b": b.bbox,
               "refs": [{"color": a.color, "shape": a.shape},
                        {"color": b.color, "shape": b.shape}]})


def multiple_choice(rng: np.random.Generator, inner: Turn) -> Turn:
  """Wrap a closed question as 4-option multiple choice with a uniformly placed answer."""
  qa = inner.qa
  wrong = [c for c in qa["candidates"] if c != qa["answer"]]
  options = [wrong[int(i)] for i in rng.choice(len(wrong), size=len(LETTERS) - 1, replace=False)]
  pos = int(rng.integers(len(LETTERS)))
  options.insert(pos, qa["answer"])
  lines = "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, options))
  tail = _t(rng, ("Answer with the option's letter from the given choices directly.",
                  "Answer with the letter of the correct option."))
  q = f"{inner.question}\n{lines}\n{tail}"
  check = {"op": "choice", "options": options, "inner": inner.check,
           "refs": inner.check.get("refs", [])}
  return Turn(q, LETTERS[pos], closed(LETTERS[pos], "choice", LETTERS,
                                      f"choice_{qa['kind']}", options=options), check)


def describe_turn(rng: np.random.Generator, caption: str) -> Turn:
  q = _t(rng, ("Describe the image.", "Describe this picture in detail.",
               "What does the image show?", "Give a detailed description of the image."))
  return Turn(q, caption)


# ---- categories ----

def _alignment(desc: S.Description, rng: np.random.Generator) -> list[Turn]:
  f, p = desc.focus, desc.panels[0]
  c = desc.category
  if c == "SynthColor":
    return [color_of_single(rng, p.objects[f["target"]])]
  if c == "SynthCount":
    shape = f["shape"] if bool(rng.integers(2)) else None
    if shape is None and any(o.color == f["color"] and o.shape != f["shape"] for o in p.objects):
      shape = f["shape"]
    return [count(rng, f["count"], f["color"], shape)]
  if c == "SynthSpatial":
    return [relation(rng, p.objects[f["a"]], p.objects[f["b"]], f["relation"])]
  if c == "SynthScene":
    if f["kind"] == "pattern":
      pattern = desc.background[1]
      q = _t(rng, ("What pattern does the background have?",
                   "Which pattern is on the background: plain, striped, checkered, dotted or "
                   "gradient?", "Describe the background pattern in one word."))
      return [Turn(q, pattern, closed(pattern, "pattern", S.PATTERNS, "pattern"), None)]
    return [shape_of(rng, p.objects[f["target"]])]
  if c == "SynthText":
    s = p.signs[f["sign"]]
    q = _t(rng, ("What word is written on the sign?", "What does the sign say?",
                 "Read the text on the sign.", "Which word appears in the image?"))
    return [Turn(q, s.text, closed(s.text, "text", S.WORDS, "read"),
                 {"op": "text", "sign": s.bbox, "refs": []})]
  raise ValueError(f"ask: {c} is not an alignment category")


def _unique_by(objs: Sequence[S.Obj], key: Callable[[S.Obj], Any]) -> list[S.Obj]:
  vals = [key(o) for o in objs]
  return [o for o, v in zip(objs, vals) if vals.count(v) == 1]


def _relation_pairs(objs: Sequence[S.Obj]) -> list[tuple[S.Obj, S.Obj, str]]:
  """Pairs of uniquely named objects whose relation is clear (one axis dominates 2:1)."""
  named = _unique_by(objs, lambda o: (o.color, o.shape))
  out = []
  for a in named:
    for b in named:
      if a is b:
        continue
      dx, dy = a.cx - b.cx, a.cy - b.cy
      if abs(dx) >= 2 * abs(dy) and abs(dx) >= 0.2:
        out.append((a, b, "left" if dx < 0 else "right"))
      elif abs(dy) >= 2 * abs(dx) and abs(dy) >= 0.2:
        out.append((a, b, "above" if dy < 0 else "below"))
  return out


def _conversation_turns(desc: S.Description, rng: np.random.Generator, n_closed: int
                        ) -> list[Turn]:
  """n_closed distinct closed questions about a conversation scene, kinds in random order.

  No turn's answer may be read off an earlier turn's text: once an object has been named by
  colour and shape (in a question or an answer), later colour / shape questions skip it, and
  "is there a <colour> object?" is only asked with answer yes for colours not named yet.
  """
  f, objs = desc.focus, desc.panels[0].objects
  key_shape = [o.shape for o in objs]
  key_color = [o.color for o in objs]
  by_shape = [i for i, k in enumerate(key_shape) if key_shape.count(k) == 1]
  by_color = [i for i, k in enumerate(key_color) if key_color.count(k) == 1]
  pairs = _relation_pairs(objs)
  present = sorted({o.color for o in objs})
  absent = [c for c in S.COLORS if c not in present]
  revealed: set[int] = set()

  def fresh(cands: Sequence[int]) -> int | None:
    left = [i for i in cands if i not in revealed]
    return left[int(rng.integers(len(left)))] if left else None

  def make(kind: str) -> tuple[Turn | None, set[int]]:
    if kind in ("color_of", "shape_of"):
      i = fresh(by_shape if kind == "color_of" else by_color)
      if i is None:
        return None, set()
      return (color_of if kind == "color_of" else shape_of)(rng, objs[i]), {i}
    if kind == "count":
      group = {i for i, o in enumerate(objs) if o.color == f["group_color"]}
      return count(rng, f["group_count"], f["group_color"], f["group_shape"]), group
    if kind == "exists":
      # "yes" only for a colour no earlier turn named (else the answer is in the context).
      # When none is left the kind is skipped before the answer is drawn: skipping only the
      # "yes" draws made later turns 58 % "no".
      unnamed = [c for c in present if c not in {objs[i].color for i in revealed}]
      if not unnamed:
        return None, set()
      if bool(rng.integers(2)):
        return exists(rng, unnamed[int(rng.integers(len(unnamed)))], True), set()
      return exists(rng, absent[int(rng.integers(len(absent)))], False), set()
    if not pairs:
      return None, set()
    a, b, rel = pairs[int(rng.integers(len(pairs)))]
    return relation(rng, a, b, rel), {objs.index(a), objs.index(b)}

  kinds = ("color_of", "shape_of", "count", "exists", "relation")
  order = [kinds[int(i)] for i in rng.permutation(len(kinds))]
  turns = []
  for k in order:
    if len(turns) == n_closed:
      break
    t, named = make(k)
    if t is not None:
      turns.append(t)
      revealed.update(named)
  return turns


def _largest_turn(rng: np.random.Generator, objs: Sequence[S.Obj],
                  region: tuple[float, float, float, float]) -> Turn | None:
  rs = sorted(o.r for o in objs)
  if len(rs) < 2 or rs[-1] < 1.3 * rs[-2]:
    return None
  o = max(objs, key=lambda q: q.r)
  q = _t(rng, ("Which object is the largest?", "What is the biggest shape in the image?"))
  return Turn(q, f"The largest object is the {o.color} {o.shape} at the "
                 f"{S.position_word(o.cx, o.cy, region)}.")


def _contrast_question(rng: np.random.Generator) -> str:
  return _t(rng, (
      "The image shows two pictures side by side. What is different between them: color, "
      "shape, count, position or size?",
      "Compare the left and the right picture. Which property changed: color, shape, count, "
      "position or size?",
      "These two pictures differ in one way. Is it the color, shape, count, position or size?"))


def _contrast(desc: S.Description, rng: np.random.Generator, long: bool) -> list[Turn]:
  change = desc.focus["change"]
  short = Turn(_contrast_question(rng), change,
               closed(change, "difference", CHANGES, "difference"),
               {"op": "difference", "refs": []})
  if not long:
    return [short]
  left, right = desc.panels
  d = desc.focus["detail"]
  detail = (f"Both pictures are on a {background_phrase(desc.background)}. The left picture "
            f"shows {panel_clause(left)}; the right picture shows {panel_clause(right)}. "
            f"They differ in one way: {d[0].lower() + d[1:]}")
  q = _t(rng, ("Now describe the difference between the two pictures in detail.",
               "Explain in detail what changed from the left picture to the right picture.",
               "Describe precisely what is different in the two pictures."))
  # The closed question comes first: the detailed answer would give it away.
  return [short, Turn(q, detail)]


def _reasoning(desc: S.Description, rng: np.random.Generator) -> list[Turn]:
  f, objs = desc.focus, desc.panels[0].objects
  kind = f["kind"]
  if kind == "larger":
    a, b = objs[f["a"]], objs[f["b"]]
    ans = "yes" if a.r > b.r else "no"
    q = _t(rng, ("Is the {a} larger than the {b}?", "Is the {a} bigger than the {b}?",
                 "Compared with the {b}, is the {a} larger?"), a=a.phrase(), b=b.phrase())
    return [Turn(q, ans, closed(ans, "yes_no", YES_NO, "larger"),
                 {"op": "larger", "a": a.bbox, "b": b.bbox,
                  "refs": [{"color": a.color, "shape": a.shape},
                           {"color": b.color, "shape": b.shape}]})]
  colors, counts = f["colors"], f["counts"]
  if kind == "more":
    ans = "yes" if counts[0] > counts[1] else "no"
    q = _t(rng, ("Are there more {a} objects than {b} objects?",
                 "Are the {a} shapes more numerous than the {b} shapes?",
                 "Does the image contain more {a} shapes than {b} shapes?"),
           a=colors[0], b=colors[1])
    return [Turn(q, ans, closed(ans, "yes_no", YES_NO, "more"),
                 {"op": "more", "a": colors[0], "b": colors[1], "refs": []})]
  if kind == "count_diff":
    ans = str(counts[0] - counts[1])
    q = _t(rng, ("How many more {a} objects than {b} objects are there?",
                 "By how many do the {a} shapes outnumber the {b} shapes?"),
           a=colors[0], b=colors[1])
    return [Turn(q, ans, closed(ans, "count", COUNT_DIFFS, "count_diff"),
                 {"op": "count_diff", "a": colors[0], "b": colors[1], "refs": []})]
  if kind == "most_common":
    q = _t(rng, ("Which colour appears most often among the shapes?",
                 "What is the most common color in the image?",
                 "Which color do most of the shapes have?"))
    return [Turn(q, colors[0], closed(colors[0], "color", S.COLORS, "most_common"),
                 {"op": "most_common", "refs": []})]
  raise ValueError(f"ask: unknown reasoning kind {kind!r}")


def _textqa(desc: S.Description, rng: np.random.Generator) -> list[Turn]:
  p = desc.panels[0]
  row = int(rng.integers(2))
  o, s = p.objects[row], p.signs[row]
  check = {"op": "text", "sign": s.bbox, "refs": [{"color": o.color, "shape": o.shape}]}
  kind = desc.focus["kind"]
  if kind == "next_to":
    q = _t(rng, ("What does the sign next to the {o} say?",
                 "What word is written on the sign beside the {o}?",
                 "Read the sign next to the {o}."), o=o.phrase())
    return [Turn(q, s.text, closed(s.text, "text", S.WORDS, "read_next_to"), check)]
  if kind == "row":
    q = _t(rng, ("What is written on the {d} sign?", "What does the {d} sign say?",
                 "Read the {d} sign."), d=("top", "bottom")[row])
    return [Turn(q, s.text, closed(s.text, "text", S.WORDS, "read_row"),
                 {"op": "text", "sign": s.bbox, "refs": []})]
  if kind == "confirm":
    truth = bool(rng.integers(2))
    word = s.text if truth else p.signs[1 - row].text
    q = _t(rng, ("Does the sign next to the {o} say \"{w}\"?",
                 "Is the word \"{w}\" written on the sign beside the {o}?"),
           o=o.phrase(), w=word.upper())
    ans = "yes" if truth else "no"
    return [Turn(q, ans, closed(ans, "yes_no", YES_NO, "confirm_text"), check)]
  raise ValueError(f"ask: unknown text QA kind {kind!r}")


class ProceduralAsker:
  """Procedural `Asker`: writes questions and answers from a structured Description.

  alignment_style: "qa" (default; one short closed question) or "caption" (alignment
    categories become "Describe the image." -> caption records, open answers).
  """

  def __init__(self, alignment_style: str = "qa"):
    if alignment_style not in ("qa", "caption"):
      raise ValueError(f"alignment_style must be 'qa' or 'caption', got {alignment_style!r}")
    self.alignment_style = alignment_style

  def ask(self, desc: S.Description, rng: np.random.Generator) -> list[Turn]:
    c = desc.category
    if c not in CATEGORIES:
      raise ValueError(f"ask: unknown category {c!r}; valid: {CATEGORIES}")
    if c in ALIGNMENT:
      if self.alignment_style == "caption":
        return [describe_turn(rng, desc.caption)]
      return _alignment(desc, rng)
    if c == "SynthMultiChoice":
      f, p = desc.focus, desc.panels[0]
      if f["kind"] == "count":
        inner = count(rng, f["count"], f["color"], f["shape"])
      elif f["kind"] == "color":
        inner = color_of(rng, p.objects[f["target"]])
      else:
        inner = shape_of(rng, p.objects[f["target"]])
      return [multiple_choice(rng, inner)]
    if c == "SynthConvShort":
      return _conversation_turns(desc, rng, 2 + int(rng.integers(2)))
    if c == "SynthConvLong":
      turns = _conversation_turns(desc, rng, 3 + int(rng.integers(3)))
      # Open turns come last: the caption would give away the closed answers.
      big = _largest_turn(rng, desc.panels[0].objects, desc.panels[0].region)
      extra = [describe_turn(rng, desc.caption)] + ([big] if big is not None else [])
      return turns + [extra[int(i)] for i in rng.permutation(len(extra))]
    if c in ("SynthContrastShort", "SynthContrastLong"):
      return _contrast(desc, rng, long=c == "SynthContrastLong")
    if c == "SynthReasoning":
      return _reasoning(desc, rng)
    return _textqa(desc, rng)
