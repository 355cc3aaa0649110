"""q, the latent tokens per question, and its candidate list `query_len`: the one home of the
facts about them that the model config, the data config, the layout and inference share.

  * the paper's candidates (4, 16, 36, 64, 144);
  * q is a positive perfect square (the q latents of a question form a sqrt(q) x sqrt(q) grid
    pooled from the tile mosaic; the same rule holds for the N image tokens of a tile);
  * the context pool of the largest q, window * sqrt(max q), fits the mosaic side 2 sqrt(N);
  * evaluation and inference use one fixed q: the configured one, else the largest candidate;
  * a config spells the candidates as a sequence of ints or a "4,16,36" string.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

CANDIDATES: tuple[int, ...] = (4, 16, 36, 64, 144)  # the paper's q candidates


def side(n: int, what: str = "q") -> int:
  """sqrt(n) of a positive perfect square n; ValueError naming `what` (e.g. "layout: q")
  otherwise."""
  n = int(n)
  r = math.isqrt(n) if n > 0 else 0
  if n <= 0 or r * r != n:
    raise ValueError(f"{what}={n} is not a perfect square > 0 (it forms a sqrt x sqrt grid); "
                     f"q candidates are like {', '.join(map(str, CANDIDATES))}")
  return r


def parse(value: Any) -> tuple[int, ...]:
  """The candidate tuple of a config value: a sequence of ints or a "4,16,36" string."""
  if isinstance(value, str):
    return tuple(int(x) for x in value.split(",") if x.strip())
  return tuple(int(x) for x in value)


def check(candidates: Sequence[int], where: str, *, window: int | None = None,
          mosaic_side: int | None = None) -> None:
  """Raises ValueError (prefixed by `where`) unless the candidates are non-empty perfect
  squares and, given window and mosaic_side, window * sqrt(max q) <= mosaic_side."""
  if not candidates:
    raise ValueError(f"{where}: query_len is empty; give the q candidates, e.g. {CANDIDATES}")
  for q in candidates:
    side(q, f"{where}: query_len candidate q")
  if window is None or mosaic_side is None:
    return
  if window <= 0:
    raise ValueError(f"{where}: window_size {window} must be positive")
  pool = window * math.isqrt(max(candidates))
  if pool > mosaic_side:
    raise ValueError(f"{where}: window_size {window} x sqrt(max q {max(candidates)}) = {pool} "
                     f"exceeds the tile mosaic side {mosaic_side}; lower the largest q or the "
                     "window size")


def eval_q(candidates: Sequence[int], q: int | None = None) -> int:
  """The fixed q of evaluation and inference: `q` when given (> 0), else the largest
  candidate."""
  return int(q) if q else max(int(c) for c in candidates)
