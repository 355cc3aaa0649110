"""render_example: a laid-out example (fusion_jax.data.layout) as readable text, for tests."""
from __future__ import annotations

import numpy as np

from fusion_jax.data.layout import IGNORE_INDEX


def render_example(ex: dict[str, np.ndarray], tokenizer, *, num_image_tokens: int | None = None,
                   show_labels: bool = False) -> str:
  """Human-readable text of one laid-out example (no batch axis), for tests.

  Text runs are decoded; the image slot renders as `[IMG x N]`, each question's latent slots as
  `[LAT x q]`; padding is omitted. With show_labels, supervised runs are wrapped in `{...}`.
  N is inferred from the run of pad ids at image_start unless `num_image_tokens` is given.
  """
  ids = np.asarray(ex["input_ids"])
  n = int(np.asarray(ex["token_mask"]).sum())
  labels = np.asarray(ex["labels"])
  start = int(ex["image_start"])
  latent = set(int(v) for v in np.asarray(ex["latent_pos"]) if v >= 0)
  n_img = 0
  if start >= 0:
    if num_image_tokens is None:
      j = start
      while j < n and ids[j] == tokenizer.pad_id and j not in latent:
        j += 1
      n_img = j - start
    else:
      n_img = num_image_tokens
  out: list[str] = []
  i = 0
  while i < n:
    if start >= 0 and i == start:
      out.append(f"[IMG x {n_img}]")
      i += n_img
      continue
    if i in latent:
      j = i
      while j < n and j in latent:
        j += 1
      out.append(f"[LAT x {j - i}]")
      i = j
      continue
    j = i
    sup = labels[i] != IGNORE_INDEX
    while (j < n and (labels[j] != IGNORE_INDEX) == sup and j not in latent
           and not (start >= 0 and j == start)):
      j += 1
    text = tokenizer.decode(ids[i:j].tolist(), continuation=i > 0)
    out.append("{" + text + "}" if (sup and show_labels) else text)
    i = j
  return "".join(out)
