"""Describe stage of the procedural backend: (category, rng) -> structured scene + caption.

FUSION writes text first (docs/model.md §15): here the "text" is a `scene.Description` whose
structured part is planned per category so the questions asked later are balanced by
construction (the answer is drawn uniformly first, then a scene is built that makes it true)
and every asked fact is visible: objects sit in distinct cells of a jittered grid with a margin,
so no two boxes touch; text signs are large relative to the image.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from fusion_jax.synth import scene as S
from fusion_jax.synth.categories import CATEGORIES

MARGIN = 0.03  # min gap between an object box and its grid cell edge; boxes are >= 2*MARGIN apart
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")
COUNT_DIFFS: tuple[str, ...] = ("1", "2", "3", "4")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
Box = tuple[float, float, float, float]
# A category builder's result: panels, focus (the plan the ask stage follows), extra caption.
Built = tuple[list[S.Panel], dict[str, Any], str]
CHANGES: tuple[str, ...] = ("color", "shape", "count", "position", "size")


def _pick(rng: np.random.Generator, items: Sequence[Any], k: int | None = None,
          exclude: Sequence[Any] = ()) -> Any:
  pool = [i for i in items if i not in set(exclude)]
  if k is None:
    return pool[int(rng.integers(len(pool)))]
  idx = rng.choice(len(pool), size=k, replace=False)
  return [pool[int(i)] for i in idx]


def _cell_box(region: Box, grid: tuple[int, int], cell: int) -> Box:
  x0, y0, x1, y1 = region
  gx, gy = grid
  cw, ch = (x1 - x0) / gx, (y1 - y0) / gy
  i, j = cell % gx, cell // gx
  return (x0 + i * cw, y0 + j * ch, x0 + (i + 1) * cw, y0 + (j + 1) * ch)


def _in_cell(rng: np.random.Generator, box: Box, r_range: tuple[float, float],
             margin: float = MARGIN) -> tuple[float, float, float]:
  """Centre and r of an object inside a cell box, at least `margin` from the box edges."""
  bx0, by0, bx1, by1 = box
  r_max = min(bx1 - bx0, by1 - by0) / 2 - margin
  lo, hi = r_range
  r = float(rng.uniform(min(lo, r_max), min(hi, r_max)))
  cx = float(rng.uniform(bx0 + r + margin, bx1 - r - margin)) if bx1 - bx0 > 2 * (r + margin) \
      else (bx0 + bx1) / 2
  cy = float(rng.uniform(by0 + r + margin, by1 - r - margin)) if by1 - by0 > 2 * (r + margin) \
      else (by0 + by1) / 2
  return round(cx, 4), round(cy, 4), round(r, 4)


def place(rng: np.random.Generator, region: Box, specs: Sequence[tuple[str, str]], r_range,
          grid: tuple[int, int] | None = None, cells: Sequence[int] | None = None
          ) -> list[S.Obj]:
  """Objects (shape, color) in distinct cells of a jittered grid over `region`.

  r_range: (lo, hi) for every object, or one (lo, hi) per object.
  """
  n = len(specs)
  if grid is None:
    g = 1 if n <= 1 else (2 if n <= 4 else 3)
    grid = (g, g)
  if cells is None:
    cells = [int(c) for c in rng.choice(grid[0] * grid[1], size=n, replace=False)]
  ranges = list(r_range) if isinstance(r_range[0], (tuple, list)) else [r_range] * n
  out = []
  for (shape, color), cell, rr in zip(specs, cells, ranges):
    cx, cy, r = _in_cell(rng, _cell_box(region, grid, cell), rr)
    out.append(S.Obj(shape=shape, color=color, cx=cx, cy=cy, r=r))
  return out


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_clause(o: S.Obj, region: Box = S.FULL_REGION) -> str:
  return f"{_article(o.phrase(with_size=True))} at the {S.position_word(o.cx, o.cy, region)}"


def panel_clause(p: S.Panel) -> str:
  parts = [object_clause(o, p.region) for o in p.objects]
  parts += [f"a sign reading \"{s.text.upper()}\" at the {S.position_word(s.cx, s.cy, p.region)}"
            for s in p.signs]
  if not parts:
    return "nothing else"
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def background_phrase(background: tuple[str, str]) -> str:
  tone, pattern = background
  return f"{S.PATTERN_ADJECTIVES[pattern]} {tone} background"


def scene_caption(background: tuple[str, str], panels: Sequence[S.Panel]) -> str:
  if len(panels) == 1:
    return f"A {background_phrase(background)} with {panel_clause(panels[0])}."
  return (f"Two pictures side by side on a {background_phrase(background)}. "
          f"Left: {panel_clause(panels[0])}. Right: {panel_clause(panels[1])}.")


def count_phrase(n: int, color: str, shape: str | None) -> str:
  noun = (shape if n == 1 else S.SHAPE_PLURALS[shape]) if shape else \
      ("object" if n == 1 else "objects")
  return f"{NUMBER_WORDS[n]} {color} {noun}"


class ProceduralDescriber:
  """Procedural `Describer`: plans a scene per category. No network, no weights."""

  def describe(self, category: str, rng: np.random.Generator) -> S.Description:
    builder = _BUILDERS.get(category)
    if builder is None:
      raise ValueError(f"describe: unknown category {category!r}; valid: {CATEGORIES}")
    background = (_pick(rng, tuple(S.BACKGROUND_TONES)), _pick(rng, S.PATTERNS))
    panels, focus, extra = builder(rng)
    caption = scene_caption(background, panels)
    if extra:
      caption += " " + extra
    return S.Description(category=category, caption=caption, panels=tuple(panels),
                         background=background, focus=focus)


def _single(objects: Sequence[S.Obj], signs: Sequence[S.Sign] = ()) -> list[S.Panel]:
  return [S.Panel(region=S.FULL_REGION, objects=tuple(objects), signs=tuple(signs))]


def _distinct_specs(rng: np.random.Generator, n: int, exclude_colors: Sequence[str] = (),
                    exclude_shapes: Sequence[str] = (), distinct_shapes: bool = True
                    ) -> list[tuple[str, str]]:
  colors = _pick(rng, S.COLORS, n, exclude=exclude_colors)
  if distinct_shapes and n <= len(S.SHAPES) - len(exclude_shapes):
    shapes = _pick(rng, S.SHAPES, n, exclude=exclude_shapes)
  else:
    shapes = [_pick(rng, S.SHAPES, exclude=exclude_shapes) for _ in range(n)]
  return list(zip(shapes, colors))


def _color(rng: np.random.Generator) -> Built:
  # One large, centred-ish object: learnable at 64 px.
  spec = _distinct_specs(rng, 1)
  objs = place(rng, S.FULL_REGION, spec, (0.16, 0.32), grid=(1, 1))
  o = objs[0]
  return _single(objs), {"target": 0}, f"The {o.shape} is {o.color}."


def _count_scene(rng: np.random.Generator, k: int, max_distractors: int = 2
                 ) -> tuple[list[S.Obj], str, str]:
  color = _pick(rng, S.COLORS)
  shape = _pick(rng, S.SHAPES)
  d = int(rng.integers(0, min(max_distractors, 9 - k) + 1))
  specs = [(shape, color)] * k + [(_pick(rng, S.SHAPES), c)
                                  for c in _pick(rng, S.COLORS, d, exclude=(color,))]
  order = rng.permutation(len(specs))
  specs = [specs[int(i)] for i in order]
  objs = place(rng, S.FULL_REGION, specs, (0.07, 0.13), grid=(3, 3))
  return objs, color, shape


def _count(rng: np.random.Generator) -> Built:
  k = int(COUNTS[int(rng.integers(len(COUNTS)))])
  objs, color, shape = _count_scene(rng, k)
  return (_single(objs), {"color": color, "shape": shape, "count": k},
          f"There {'is' if k == 1 else 'are'} {count_phrase(k, color, shape)}.")


def _spatial(rng: np.random.Generator) -> Built:
  rel = _pick(rng, RELATIONS)
  (sa, ca), (sb, cb), *rest = _distinct_specs(rng, 2 + int(rng.integers(0, 2)))
  line = int(rng.integers(3))
  # a and b on opposite ends of one row (left/right) or column (above/below): the relation
  # axis dominates the other by construction.
  if rel in ("left", "right"):
    ca_cell = line * 3 + (0 if rel == "left" else 2)
    cb_cell = line * 3 + (2 if rel == "left" else 0)
  else:
    ca_cell, cb_cell = (0 if rel == "above" else 6) + line, (6 if rel == "above" else 0) + line
  cells = [ca_cell, cb_cell]
  free = [c for c in range(9) if c not in cells and c != 4 and (c // 3 != line if rel in (
      "left", "right") else c % 3 != line)]
  cells += [int(c) for c in rng.choice(free, size=len(rest), replace=False)]
  objs = place(rng, S.FULL_REGION, [(sa, ca), (sb, cb)] + rest, (0.08, 0.14), grid=(3, 3),
               cells=cells)
  a, b = objs[0], objs[1]
  word = {"left": "to the left of", "right": "to the right of", "above": "above",
          "below": "below"}[rel]
  return _single(objs), {"a": 0, "b": 1, "relation": rel}, \
      f"The {a.phrase()} is {word} the {b.phrase()}."


def _scene(rng: np.random.Generator) -> Built:
  kind = _pick(rng, ("pattern", "shape"))
  objs = place(rng, S.FULL_REGION, _distinct_specs(rng, 1 + int(rng.integers(3))), (0.1, 0.2))
  return _single(objs), {"kind": kind, "target": 0}, ""


def _sign_in_middle(rng: np.random.Generator, word: str, n_objects: int
                    ) -> tuple[S.Sign, list[S.Obj]]:
  w = float(rng.uniform(0.62, 0.85))
  h = round(w * float(rng.uniform(0.38, 0.42)), 4)
  sign = S.Sign(text=word, cx=round(float(rng.uniform(0.45, 0.55)), 4),
                cy=round(float(rng.uniform(0.47, 0.53)), 4), w=round(w, 4), h=h)
  # Objects only in the top and bottom rows, clear of the sign's band.
  band = (sign.bbox[1] - MARGIN, sign.bbox[3] + MARGIN)
  objs = []
  if n_objects:
    specs = _distinct_specs(rng, n_objects)
    cells = [int(c) for c in rng.choice(6, size=n_objects, replace=False)]
    for spec, cell in zip(specs, cells):
      top = cell < 3
      region = (0.0, 0.0, 1.0, band[0]) if top else (0.0, band[1], 1.0, 1.0)
      objs += place(rng, region, [spec], (0.06, 0.1), grid=(3, 1), cells=[cell % 3])
  return sign, objs


def _text(rng: np.random.Generator) -> Built:
  word = _pick(rng, S.WORDS)
  sign, objs = _sign_in_middle(rng, word, int(rng.integers(0, 3)))
  return _single(objs, [sign]), {"sign": 0}, f"The sign says \"{word.upper()}\"."


def _multichoice(rng: np.random.Generator) -> Built:
  kind = _pick(rng, ("color", "shape", "count"))
  if kind == "count":
    k = int(COUNTS[int(rng.integers(len(COUNTS)))])
    objs, color, shape = _count_scene(rng, k)
    return _single(objs), {"kind": kind, "color": color, "shape": shape, "count": k}, ""
  objs = place(rng, S.FULL_REGION, _distinct_specs(rng, 2 + int(rng.integers(3))), (0.08, 0.2))
  return _single(objs), {"kind": kind, "target": int(rng.integers(len(objs)))}, ""


def _conversation(rng: np.random.Generator) -> Built:
  """A group of k same-coloured same-shaped objects plus 1-3 unique others."""
  k = int(COUNTS[int(rng.integers(len(COUNTS)))])
  g_shape, g_color = _distinct_specs(rng, 1)[0]
  m = 1 + int(rng.integers(min(3, 9 - k)))
  others = _distinct_specs(rng, m, exclude_colors=(g_color,), exclude_shapes=(g_shape,))
  specs = [(g_shape, g_color)] * k + others
  order = rng.permutation(len(specs))
  objs = place(rng, S.FULL_REGION, [specs[int(i)] for i in order], (0.07, 0.13), grid=(3, 3))
  return _single(objs), {"group_color": g_color, "group_shape": g_shape, "group_count": k}, ""


def _contrast(rng: np.random.Generator) -> Built:
  """Two panels that differ in exactly one way; panel objects have distinct colours."""
  change = _pick(rng, CHANGES)
  n = {"position": 1 + int(rng.integers(2)), "count": 1 + int(rng.integers(3))}.get(
      change, 1 + int(rng.integers(3)))
  specs = _distinct_specs(rng, n, distinct_shapes=False)
  grid = (1, 3)
  cells = [int(c) for c in rng.choice(3, size=n, replace=False)]
  small = change == "size" and bool(rng.integers(2))
  r_range = (0.06, 0.08) if small else ((0.11, 0.13) if change == "size" else (0.08, 0.13))
  base = place(rng, S.LEFT_REGION, specs, r_range, grid=grid, cells=cells)
  changed = list(base)
  i = int(rng.integers(n))
  o = base[i]
  used = {b.color for b in base}
  if change == "color":
    changed[i] = S.Obj(o.shape, _pick(rng, S.COLORS, exclude=used), o.cx, o.cy, o.r)
  elif change == "shape":
    changed[i] = S.Obj(_pick(rng, S.SHAPES, exclude=(o.shape,)), o.color, o.cx, o.cy, o.r)
  elif change == "size":
    r = round(o.r * (1.6 if small else 0.55), 4)
    # Keep the grown object inside its cell.
    bx0, by0, bx1, by1 = _cell_box(S.LEFT_REGION, grid, cells[i])
    cx = min(max(o.cx, bx0 + r + MARGIN), bx1 - r - MARGIN)
    cy = min(max(o.cy, by0 + r + MARGIN), by1 - r - MARGIN)
    changed[i] = S.Obj(o.shape, o.color, round(cx, 4), round(cy, 4), r)
  elif change == "position":
    free = [c for c in range(3) if c not in cells]
    cell = int(rng.choice(free))
    cx, cy, _ = _in_cell(rng, _cell_box(S.LEFT_REGION, grid, cell), (o.r, o.r))
    changed[i] = S.Obj(o.shape, o.color, cx, cy, o.r)
  else:  # count: add one object (needs a free cell) or remove one (needs >= 2 objects)
    add = n == 1 or (n < 3 and bool(rng.integers(2)))
    if add:
      free = [c for c in range(3) if c not in cells]
      spec = (_pick(rng, S.SHAPES), _pick(rng, S.COLORS, exclude=used))
      changed.append(place(rng, S.LEFT_REGION, [spec], r_range, grid=grid,
                           cells=[int(rng.choice(free))])[0])
    else:
      del changed[i]
  # The changed scene is on the right or on the left with equal probability.
  dx = S.RIGHT_REGION[0] - S.LEFT_REGION[0]
  shift = lambda objs: tuple(S.Obj(q.shape, q.color, round(q.cx + dx, 4), q.cy, q.r) for q in objs)
  if bool(rng.integers(2)):
    panels = [S.Panel(S.LEFT_REGION, tuple(base)), S.Panel(S.RIGHT_REGION, shift(changed))]
  else:
    panels = [S.Panel(S.LEFT_REGION, tuple(changed)), S.Panel(S.RIGHT_REGION, shift(base))]
  focus = {"change": change, "detail": contrast_detail(panels, change)}
  return panels, focus, focus["detail"]


def contrast_detail(panels: Sequence[S.Panel], change: str) -> str:
  """One sentence naming the difference between the two panels."""
  left, right = list(panels[0].objects), list(panels[1].objects)
  if change == "count":
    key = lambda o: (o.color, o.shape)
    lk, rk = {key(o) for o in left}, {key(o) for o in right}
    if len(right) > len(left):
      (c, s), = rk - lk
      return f"The right picture has an extra {c} {s} that the left picture does not have."
    (c, s), = lk - rk
    return f"The {c} {s} in the left picture is missing from the right picture."
  for a, b in zip(left, right):
    if change == "color" and a.color != b.color:
      return (f"The {a.shape} that is {a.color} in the left picture is {b.color} in the right "
              "picture.")
    if change == "shape" and a.shape != b.shape:
      return (f"The {a.color} {a.shape} in the left picture is {_article(b.shape)} in the right "
              "picture.")
    if change == "size" and a.r != b.r:
      word = "bigger" if b.r > a.r else "smaller"
      return f"The {a.color} {a.shape} is {word} in the right picture than in the left picture."
    moved = abs(a.cx + S.RIGHT_REGION[0] - S.LEFT_REGION[0] - b.cx) + abs(a.cy - b.cy) > 1e-3
    if change == "position" and moved:
      pa = S.position_word(a.cx, a.cy, panels[0].region)
      pb = S.position_word(b.cx, b.cy, panels[1].region)
      return (f"The {a.color} {a.shape} is at the {pa} of the left picture but at the {pb} of "
              "the right picture.")
  raise ValueError(f"contrast_detail: panels do not differ by {change!r}")


def _reasoning(rng: np.random.Generator) -> Built:
  kind = _pick(rng, ("more", "count_diff", "most_common", "larger"))
  if kind == "larger":
    specs = _distinct_specs(rng, 2 + int(rng.integers(2)))
    big = int(rng.integers(2))
    # One of the two compared objects is clearly bigger (box side ratio >= 1.6).
    r_ranges = [(0.17, 0.21) if i == big else (0.07, 0.1) for i in range(len(specs))]
    objs = place(rng, S.FULL_REGION, specs, r_ranges, grid=(2, 2))
    answer = _pick(rng, ("yes", "no"))
    a, b = (big, 1 - big) if answer == "yes" else (1 - big, big)
    return _single(objs), {"kind": kind, "a": a, "b": b}, ""
  if kind == "count_diff":
    d = int(_pick(rng, COUNT_DIFFS))
    nb = 1 + int(rng.integers(min(6 - d, (9 - d) // 2)))  # na + nb <= 9 grid cells
    counts = [nb + d, nb]
  elif kind == "more":
    na, nb = (int(v) for v in 1 + rng.choice(4, size=2, replace=False))
    counts = [max(na, nb), min(na, nb)] if _pick(rng, ("yes", "no")) == "yes" else \
        [min(na, nb), max(na, nb)]
  else:  # most_common: the winner's count is strictly the largest
    top = 2 + int(rng.integers(3))
    counts = [top] + [1 + int(rng.integers(top - 1)) for _ in range(1 + int(rng.integers(2)))]
    while sum(counts) > 9:  # at most one object per cell of the 3x3 grid
      k = max(range(1, len(counts)), key=lambda j: counts[j])
      counts[k] -= 1
  colors = _pick(rng, S.COLORS, len(counts))
  specs = []
  for c, n in zip(colors, counts):
    specs += [(_pick(rng, S.SHAPES), c) for _ in range(n)]
  order = rng.permutation(len(specs))
  objs = place(rng, S.FULL_REGION, [specs[int(i)] for i in order], (0.07, 0.13), grid=(3, 3))
  focus = {"kind": kind, "colors": list(colors), "counts": counts}
  return _single(objs), focus, ""


def _textqa(rng: np.random.Generator) -> Built:
  """Two rows, each an object with a sign beside it (wide signs stay readable at 64 px)."""
  words = _pick(rng, S.WORDS, 2)
  specs = _distinct_specs(rng, 2)
  objs, signs = [], []
  for row in range(2):
    y0 = 0.5 * row
    w = round(float(rng.uniform(0.54, 0.6)), 4)
    h = round(float(rng.uniform(0.24, 0.28)), 4)
    cx = round(1.0 - MARGIN - w / 2 - float(rng.uniform(0.0, 0.02)), 4)
    cy = round(y0 + 0.25 + float(rng.uniform(-0.03, 0.03)), 4)
    signs.append(S.Sign(text=words[row], cx=cx, cy=cy, w=w, h=h))
    obj_box = (0.0, y0, cx - w / 2 - MARGIN, y0 + 0.5)
    objs += place(rng, obj_box, [specs[row]], (0.08, 0.13), grid=(1, 1))
  return _single(objs, signs), {"kind": _pick(rng, ("next_to", "row", "confirm"))}, ""


_BUILDERS: dict[str, Callable] = {
    "SynthColor": _color,
    "SynthCount": _count,
    "SynthSpatial": _spatial,
    "SynthScene": _scene,
    "SynthText": _text,
    "SynthMultiChoice": _multichoice,
    "SynthConvShort": _conversation,
    "SynthConvLong": _conversation,
    "SynthContrastShort": _contrast,
    "SynthContrastLong": _contrast,
    "SynthReasoning": _reasoning,
    "SynthTextQA": _textqa,
}
