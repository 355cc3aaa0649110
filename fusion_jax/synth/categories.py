"""The synthesis categories of FUSION's Synthesized Language-Driven QA data (docs/model.md §15).

Alignment categories (stage 1 style: one short question about one visual attribute; with
`alignment_style="caption"` they become caption records instead) and instruction categories
(stage 2 style: multiple choice, multi-turn conversations, two-panel contrasts, reasoning and
text reading).
"""
from __future__ import annotations

ALIGNMENT: tuple[str, ...] = ("SynthColor", "SynthCount", "SynthSpatial", "SynthScene",
                              "SynthText")
INSTRUCTION: tuple[str, ...] = ("SynthMultiChoice", "SynthConvShort", "SynthConvLong",
                                "SynthContrastShort", "SynthContrastLong", "SynthReasoning",
                                "SynthTextQA")
CATEGORIES: tuple[str, ...] = ALIGNMENT + INSTRUCTION
CONTRAST: tuple[str, ...] = ("SynthContrastShort", "SynthContrastLong")


def parse_categories(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
  """Comma-separated string or list -> validated tuple in canonical order ('all' = every one).

  Raises ValueError naming the unknown category and listing the valid ones.
  """
  if names is None:
    return CATEGORIES
  if isinstance(names, str):
    names = [n for n in names.replace(" ", ",").split(",") if n]
  items: list[str] = []
  for n in names:
    items += [m for m in str(n).replace(" ", ",").split(",") if m]
  if not items or items == ["all"]:
    return CATEGORIES
  lookup = {c.lower(): c for c in CATEGORIES}
  lookup.update({c.lower()[len("synth"):]: c for c in CATEGORIES})
  out = []
  for n in items:
    key = n.lower()
    if key == "alignment":
      out += ALIGNMENT
    elif key == "instruction":
      out += INSTRUCTION
    elif key in lookup:
      out.append(lookup[key])
    else:
      raise ValueError(f"unknown synthesis category {n!r}; valid: {', '.join(CATEGORIES)} "
                       "(or 'all', 'alignment', 'instruction')")
  return tuple(c for c in CATEGORIES if c in set(out))
