"""Pixel measurements for the filter: recover asked facts from the rendered image alone.

Independent of the renderer's bookkeeping: pixels are classified to the nearest palette colour
(within COLOR_TOL, else background), connected components (4-connectivity, run-length
union-find) give blobs, and each blob yields colour, area, box, centroid and a shape class from
its fill ratio and centroid offset. Only the descriptions' boxes are used to say *which* blob a
question is about, never what its colour, count, shape or position is.

Images larger than MAX_CHECK_SIDE are measured on a strided subsample (exact pixels, no
resampling), which keeps the check cheap at 384 px.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from fusion_jax.synth import scene as S

COLOR_TOL = 35.0      # max RGB distance of an object pixel to its palette colour
MAX_CHECK_SIDE = 128  # measure on a subsample at most this wide
MIN_BLOB_PX = 3       # blobs smaller than this (check pixels) are edge fragments
MIN_SHAPE_PX = 10     # shape classification needs a box at least this wide and tall
MIN_TEXT_PX = 6       # glyph height (full-resolution pixels) below which text is unreadable
_PAL = np.asarray([S.PALETTE[c] for c in S.COLORS], np.int32)


@dataclasses.dataclass(frozen=True)
class Blob:
  """One connected region of a palette colour; coordinates normalised to the image side."""
  color: str
  area: int           # in check pixels
  box: tuple[float, float, float, float]
  cx: float
  cy: float
  box_px: tuple[int, int]   # (width, height) in check pixels
  fill: float               # area / box area
  v_offset: float           # (centroid y - box centre y) / box height

  @property
  def shape(self) -> str | None:
    return classify_shape(self.fill, self.v_offset, self.box_px)


def classify_shape(fill: float, v_offset: float, box_px: tuple[int, int]) -> str | None:
  """Shape from the fill ratio of the bounding box (square 1, circle ~.79, triangle / diamond
  .50-.60, star .31-.46 measured at 64-384 px) and the centroid offset (a triangle's centroid
  sits 1/6 of its height below its box centre).
  None when the blob is too small to tell."""
  if min(box_px) < MIN_SHAPE_PX:
    return None
  if fill >= 0.855:  # ragged partly covered edges lower a small square's fill
    return "square"
  if fill >= 0.66:
    return "circle"
  if fill >= 0.48:
    return "triangle" if v_offset > 0.08 else "diamond"
  return "star"


@functools.lru_cache(maxsize=1)
def _color_lut() -> np.ndarray:
  """(64**3,) int8: palette index of each 6-bit-per-channel colour bin (-1 = none).

  Bins are judged at their centre, so the effective tolerance is COLOR_TOL +- 2.6.
  """
  q = (np.arange(64, dtype=np.float32) * 4 + 1.5)
  grid = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 1, 3)
  d2 = ((grid - _PAL[None].astype(np.float32)) ** 2).sum(-1)  # (64**3, P)
  idx = d2.argmin(-1)
  best = d2[np.arange(len(idx)), idx]
  return np.where(best <= COLOR_TOL ** 2, idx, -1).astype(np.int8)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 -> (H, W) int8 palette index, -1 where no palette colour is within tol."""
  x = image >> 2
  key = (x[..., 0].astype(np.int32) << 12) | (x[..., 1].astype(np.int32) << 6) | x[..., 2]
  return _color_lut()[key]


def label_runs(labels: np.ndarray) -> list[dict[str, Any]]:
  """Connected components (4-connectivity) of equal non-negative labels.

  Returns one dict per component: label, area, x0, y0, x1, y1 (inclusive pixel box), sx, sy
  (pixel coordinate sums for the centroid).
  """
  h, w = labels.shape
  start = np.ones((h, w), bool)
  start[:, 1:] = labels[:, 1:] != labels[:, :-1]
  ys, xs = np.nonzero(start)
  ends = np.empty_like(xs)
  ends[:-1] = xs[1:]
  ends[-1] = w
  row_end = np.ones(len(ys), bool)
  row_end[:-1] = ys[1:] != ys[:-1]
  ends[row_end] = w
  vals = labels[ys, xs]
  keep = vals >= 0
  ys, xs = ys[keep].tolist(), xs[keep].tolist()
  ends, vals = ends[keep].tolist(), vals[keep].tolist()
  n = len(ys)
  parent = list(range(n))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  # Runs are in row-major order; merge each row with the previous one (two pointers).
  prev_lo = prev_hi = 0
  i = 0
  while i < n:
    y = ys[i]
    j = i
    while j < n and ys[j] == y:
      j += 1
    if prev_hi > prev_lo and ys[prev_lo] == y - 1:
      a, b = prev_lo, i
      while a < prev_hi and b < j:
        if xs[a] < ends[b] and xs[b] < ends[a] and vals[a] == vals[b]:
          ra, rb = find(a), find(b)
          if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        if ends[a] <= ends[b]:
          a += 1
        else:
          b += 1
    prev_lo, prev_hi = i, j
    i = j
  comps: dict[int, dict[str, Any]] = {}
  for k in range(n):
    r = find(k)
    length = ends[k] - xs[k]
    c = comps.get(r)
    if c is None:
      c = comps[r] = {"label": vals[k], "area": 0, "x0": xs[k], "y0": ys[k], "x1": ends[k] - 1,
                      "y1": ys[k], "sx": 0.0, "sy": 0.0}
    c["area"] += length
    c["x0"] = min(c["x0"], xs[k])
    c["x1"] = max(c["x1"], ends[k] - 1)
    c["y0"] = min(c["y0"], ys[k])
    c["y1"] = max(c["y1"], ys[k])
    c["sx"] += (xs[k] + ends[k] - 1) * length / 2.0
    c["sy"] += ys[k] * length
  return list(comps.values())


class Analysis:
  """Blobs of an image, measured once and queried by the filter's checks."""

  def __init__(self, image: np.ndarray):
    h, w, _ = image.shape
    self.size = max(h, w)
    self.stride = max(1, -(-self.size // MAX_CHECK_SIDE))
    off = self.stride // 2
    sub = image[off::self.stride, off::self.stride]
    self.blobs: list[Blob] = []
    for c in label_runs(classify_pixels(sub)):
      if c["area"] < MIN_BLOB_PX:
        continue
      bw, bh = c["x1"] - c["x0"] + 1, c["y1"] - c["y0"] + 1
      to_n = lambda p: (p * self.stride + off + 0.5) / self.size
      cy_px = c["sy"] / c["area"]
      self.blobs.append(Blob(
          color=S.COLORS[c["label"]], area=int(c["area"]),
          box=(to_n(c["x0"] - 0.5), to_n(c["y0"] - 0.5), to_n(c["x1"] + 0.5), to_n(c["y1"] + 0.5)),
          cx=to_n(c["sx"] / c["area"]), cy=to_n(cy_px), box_px=(bw, bh),
          fill=c["area"] / float(bw * bh),
          v_offset=(cy_px - (c["y0"] + c["y1"]) / 2.0) / bh))

  def in_region(self, region: Sequence[float]) -> list[Blob]:
    x0, y0, x1, y1 = region
    return [b for b in self.blobs if x0 <= b.cx < x1 and y0 <= b.cy < y1]

  def counts(self, region: Sequence[float]) -> dict[str, int]:
    out = {c: 0 for c in S.COLORS}
    for b in self.in_region(region):
      out[b.color] += 1
    return out

  def blob_at(self, box: Sequence[float]) -> Blob | None:
    """The largest blob whose centroid lies inside `box` (normalised)."""
    cands = self.in_region(box)
    return max(cands, key=lambda b: b.area) if cands else None


AMBIGUOUS = "<ambiguous>"  # a measurement that exists but does not single out one answer


def relation(a: Blob, b: Blob, dominance: float = 1.5, min_sep: float = 0.08) -> str:
  """Where a is relative to b: 'left' | 'right' | 'above' | 'below', or AMBIGUOUS."""
  dx, dy = a.cx - b.cx, a.cy - b.cy
  if abs(dx) >= dominance * abs(dy) and abs(dx) >= min_sep:
    return "left" if dx < 0 else "right"
  if abs(dy) >= dominance * abs(dx) and abs(dy) >= min_sep:
    return "above" if dy < 0 else "below"
  return AMBIGUOUS


def panel_signature(an: Analysis, region: Sequence[float]) -> dict[str, Blob]:
  """colour -> blob for a contrast panel (whose objects have distinct colours)."""
  out: dict[str, Blob] = {}
  for b in an.in_region(region):
    if b.color in out:
      return {}
    out[b.color] = b
  return out


def difference(an: Analysis, left: Sequence[float], right: Sequence[float]) -> str:
  """Kind of the single difference between two panels, from their blobs."""
  lb, rb = an.in_region(left), an.in_region(right)
  if len(lb) != len(rb):
    return "count"
  ls, rs = panel_signature(an, left), panel_signature(an, right)
  if not ls or not rs:
    return AMBIGUOUS
  if set(ls) != set(rs):
    return "color"
  dx = right[0] - left[0]
  found = set()
  unsure = False  # a blob too small to classify its shape
  for c, a in ls.items():
    b = rs[c]
    if abs(b.cx - dx - a.cx) + abs(b.cy - a.cy) > 0.08:
      found.add("position")
      continue
    side_a = max(a.box[2] - a.box[0], a.box[3] - a.box[1])
    side_b = max(b.box[2] - b.box[0], b.box[3] - b.box[1])
    ratio = max(side_a, side_b) / max(min(side_a, side_b), 1e-9)
    known = a.shape is not None and b.shape is not None
    if known and a.shape != b.shape:
      found.add("shape")
    # Size changes are x1.6 or x0.55; a small star's measured box shrinks more than other
    # shapes' at low resolution, so demand more when the shapes are not known to agree.
    elif ratio > (1.3 if known else 1.55):
      found.add("size")
    elif not known:
      unsure = True
  if len(found) == 1:
    return found.pop()
  return None if (unsure and not found) else AMBIGUOUS


def text_height_px(image: np.ndarray, bbox: Sequence[float]) -> int:
  """Height in pixels of the dark ink inside a sign's plate (border excluded); 0 if none."""
  h, w, _ = image.shape
  x0, y0, x1, y1 = bbox
  # Stay well inside the border (6% of the plate height plus anti-aliasing).
  inset_y = 0.15 * (y1 - y0)
  inset_x = 0.04 * (x1 - x0)
  px0, px1 = int(np.ceil((x0 + inset_x) * w)), int(np.floor((x1 - inset_x) * w))
  py0, py1 = int(np.ceil((y0 + inset_y) * h)), int(np.floor((y1 - inset_y) * h))
  if px1 <= px0 or py1 <= py0:
    return 0
  crop = image[py0:py1, px0:px1].astype(np.int32)
  dark = (crop.max(-1) < 120) & (crop.max(-1) - crop.min(-1) < 40)
  rows = np.nonzero(dark.any(1))[0]
  if rows.size == 0:
    return 0
  return int(rows[-1] - rows[0] + 1)


def measure(check: Mapping[str, Any], an: Analysis, image: np.ndarray,
            desc: S.Description) -> str | None:
  """Answer a check spec from pixels. None: nothing measurable; AMBIGUOUS: no single answer."""
  op = check["op"]
  region = desc.panels[check.get("panel", 0)].region if desc.panels else S.FULL_REGION
  if op == "choice":
    inner = measure(check["inner"], an, image, desc)
    if inner is None or inner == AMBIGUOUS:
      return inner
    options = list(check["options"])
    return "ABCDEFGH"[options.index(inner)] if inner in options else f"<{inner}>"
  if op == "color_of":
    b = an.blob_at(check["bbox"])
    return b.color if b else AMBIGUOUS
  if op == "shape_of":
    b = an.blob_at(check["bbox"])
    return (b.shape if b else AMBIGUOUS)
  if op == "count":
    return str(an.counts(region)[check["color"]])
  if op == "exists":
    return "yes" if an.counts(region)[check["color"]] > 0 else "no"
  if op in ("more", "count_diff"):
    counts = an.counts(region)
    na, nb = counts[check["a"]], counts[check["b"]]
    if op == "more":
      return AMBIGUOUS if na == nb else ("yes" if na > nb else "no")
    return str(na - nb)
  if op == "most_common":
    counts = sorted(an.counts(region).items(), key=lambda kv: -kv[1])
    return AMBIGUOUS if counts[0][1] == counts[1][1] else counts[0][0]
  if op == "relation":
    a, b = an.blob_at(check["a"]), an.blob_at(check["b"])
    return relation(a, b) if a and b else AMBIGUOUS
  if op == "larger":
    a, b = an.blob_at(check["a"]), an.blob_at(check["b"])
    if not (a and b):
      return AMBIGUOUS
    sa = max(a.box[2] - a.box[0], a.box[3] - a.box[1])
    sb = max(b.box[2] - b.box[0], b.box[3] - b.box[1])
    if max(sa, sb) / max(min(sa, sb), 1e-9) < 1.25:
      return AMBIGUOUS
    return "yes" if sa > sb else "no"
  if op == "difference":
    return difference(an, desc.panels[0].region, desc.panels[1].region)
  if op == "text":
    return None  # readability is checked separately; reading text back needs OCR
  raise ValueError(f"measure: unknown check op {op!r}")
