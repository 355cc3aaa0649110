"""Structured scene descriptions: the "text first" object every synthesis stage passes along.

A `Description` is what the describe stage produces and the render and ask stages consume. It
holds the caption text (always) and, for the procedural backend, the structured scene it was
written from: one or two `Panel`s (two for the side-by-side contrast categories) of `Obj`ects
and text `Sign`s on a textured background.

Coordinates are normalised to the whole (square) image: x, y in [0, 1] from the top-left
corner, and an object's half-extent `r` is a fraction of the image side, so a description is
independent of the resolution it is rendered at. Every object occupies the axis-aligned box
[cx - r, cx + r] x [cy - r, cy + r]; the filter's occlusion check works on these boxes.

The palette is chosen so that every pair of named colours is >= 95 apart in RGB (Euclidean),
every background tone (and its darker pattern shade) is >= 88 from every palette colour, and the
anti-aliased blend of any palette colour with any background passes no closer than 55 to a
third palette colour. The pixel checks (`measure.py`) rely on these margins.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Named palette: canonical answer strings -> RGB. Saturated so backgrounds (low saturation)
# never get classified as an object colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 125, 15),
    "yellow": (245, 225, 35),
    "green": (40, 160, 50),
    "cyan": (30, 190, 205),
    "blue": (35, 70, 215),
    "purple": (130, 45, 175),
    "pink": (245, 115, 190),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

# Shapes are separable from pixels by the fill ratio of their bounding box and the vertical
# offset of their centroid (see measure.classify_shape).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
SHAPE_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

# Background tones (low saturation) and the pattern drawn with a darker shade of the tone.
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "beige": (222, 210, 185),
    "gray": (200, 200, 200),
    "slate": (170, 180, 190),
    "sand": (205, 190, 160),
    "mint": (200, 220, 205),
    "lavender": (210, 205, 225),
    "cream": (240, 235, 215),
    "stone": (150, 150, 145),
}
PATTERN_SHADE = -30  # the second tone of a pattern: tone + PATTERN_SHADE per channel
PATTERNS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "gradient")
PATTERN_ADJECTIVES: dict[str, str] = {
    "plain": "plain", "striped": "striped", "checkered": "checkered", "dotted": "dotted",
    "gradient": "softly shaded"}

# Sign plates: near-white plate, near-black ink, dark border; none of them is a palette colour.
SIGN_PLATE = (245, 245, 240)
SIGN_INK = (25, 25, 35)
SIGN_BORDER = (60, 60, 70)
DIVIDER = (70, 70, 80)  # the line between the two panels of a contrast image

# Words for text signs: short, upper case when drawn, answered in lower case.
WORDS: tuple[str, ...] = ("stop", "open", "exit", "park", "cafe", "shop", "taxi", "book",
                          "fish", "milk", "sale", "bank")

# Size words from the half-extent r (fraction of the image side).
SIZE_BOUNDS: tuple[tuple[str, float], ...] = (("small", 0.09), ("medium", 0.15), ("large", 1.0))


def size_word(r: float) -> str:
  """'small' | 'medium' | 'large' for a half-extent r (fraction of the image side)."""
  for name, bound in SIZE_BOUNDS:
    if r < bound:
      return name
  return SIZE_BOUNDS[-1][0]


def position_word(x: float, y: float, region: tuple[float, float, float, float]) -> str:
  """Coarse position of (x, y) inside a panel region: 'top left', 'center', 'bottom', ..."""
  x0, y0, x1, y1 = region
  u = (x - x0) / max(x1 - x0, 1e-9)
  v = (y - y0) / max(y1 - y0, 1e-9)
  col = "left" if u < 1 / 3 else ("right" if u > 2 / 3 else "")
  row = "top" if v < 1 / 3 else ("bottom" if v > 2 / 3 else "")
  if row and col:
    return f"{row} {col}"
  return row or col or "center"


@dataclasses.dataclass(frozen=True)
class Obj:
  """A filled shape: centre (cx, cy) and half-extent r, all fractions of the image side."""
  shape: str
  color: str
  cx: float
  cy: float
  r: float

  @property
  def bbox(self) -> tuple[float, float, float, float]:
    return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

  def phrase(self, with_size: bool = False) -> str:
    """'red circle' / 'large red circle'."""
    words = ([size_word(self.r)] if with_size else []) + [self.color, self.shape]
    return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Sign:
  """A text plate: centre (cx, cy), full width w and height h (fractions of the image side)."""
  text: str
  cx: float
  cy: float
  w: float
  h: float

  @property
  def bbox(self) -> tuple[float, float, float, float]:
    return (self.cx - self.w / 2, self.cy - self.h / 2, self.cx + self.w / 2, self.cy + self.h / 2)


@dataclasses.dataclass(frozen=True)
class Panel:
  """One scene: its region of the image (x0, y0, x1, y1) and what is drawn in it."""
  region: tuple[float, float, float, float]
  objects: tuple[Obj, ...] = ()
  signs: tuple[Sign, ...] = ()


@dataclasses.dataclass(frozen=True)
class Description:
  """Output of the describe stage.

  category: the synthesis category this description was written for.
  caption: the natural-language description (what a text-to-image backend draws from).
  panels: the structured scene (empty for text-only user backends).
  background: (tone name, pattern name) shared by all panels.
  focus: category-specific plan the describe stage chose (e.g. the count to ask about, the
    change between two contrast panels); free-form, JSON-serialisable.
  """
  category: str
  caption: str
  panels: tuple[Panel, ...] = ()
  background: tuple[str, str] = ("gray", "plain")
  focus: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Description":
    panels = tuple(
        Panel(region=tuple(p["region"]),
              objects=tuple(Obj(**o) for o in p.get("objects", ())),
              signs=tuple(Sign(**s) for s in p.get("signs", ())))
        for p in d.get("panels", ()))
    return cls(category=d["category"], caption=d["caption"], panels=panels,
               background=tuple(d.get("background", ("gray", "plain"))),
               focus=dict(d.get("focus", {})))


FULL_REGION = (0.0, 0.0, 1.0, 1.0)
# Contrast images: two panels side by side with a divider strip in the middle.
LEFT_REGION = (0.0, 0.0, 0.49, 1.0)
RIGHT_REGION = (0.51, 0.0, 1.0, 1.0)
