"""Synthesized items for base-model pretraining, from a seed the main job never uses.

fusion_jax.synth draws item i of a run with seed s from SeedSequence(s, spawn_key=(i, stage))
(synth/pipeline.py), so a different entropy `s` gives independent scenes. The main job uses
config.synth.seed (experiments/smoke.py: 0); pretraining uses PRETRAIN_SEED. `build_items`
additionally drops any item whose image bytes hash into `exclude` (the main job's held-out
images, when given), so not even a chance pixel-identical render of a held-out image is seen.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Collection, Sequence

import numpy as np

from fusion_jax.synth.backends import BackendConfig
from fusion_jax.synth.pipeline import item_rngs
from fusion_jax.synth.render import object_labels
from fusion_jax.synth.scene import PATTERNS

# Entropy of the pretraining scenes; the main job's datasets use small seeds (smoke.py: 0).
PRETRAIN_SEED = 16_000_001


@dataclasses.dataclass(frozen=True)
class Item:
  """One synthesized scene: image (H, W, 3) uint8, its caption and its QA turns."""
  image: np.ndarray
  caption: str
  qa: tuple[tuple[str, str], ...]   # (question, answer)
  category: str
  choices: tuple[tuple[str, ...], ...] = ()  # per qa turn: its closed candidates, () if open
  # What is drawn where (synth.render.object_labels): (H, W, 2) shape / colour ids, 0 = none.
  object_labels: np.ndarray | None = None
  pattern: int = -1  # index of the background pattern in synth.scene.PATTERNS (-1 unknown)


def image_hash(image: np.ndarray) -> str:
  """sha256 of the raw uint8 pixels (shape included)."""
  a = np.ascontiguousarray(image, dtype=np.uint8)
  return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def build_items(num: int, categories: Sequence[str], size: int, *, seed: int = PRETRAIN_SEED,
                exclude: Collection[str] = ()) -> list[Item]:
  """`num` items (round-robin over categories) that pass the synth filter.

  exclude: image hashes (`image_hash`) never to return.
  """
  if seed == 0:
    raise ValueError("pairs.build_items: seed 0 is the main job's dataset seed; use PRETRAIN_SEED")
  b = BackendConfig().build()
  items: list[Item] = []
  index = 0
  while len(items) < num:
    category = categories[index % len(categories)]
    rngs = item_rngs(seed, index)
    index += 1
    desc = b["describer"].describe(category, rngs["describe"])
    image = b["renderer"].render(desc, size, rngs["render"])
    turns = b["asker"].ask(desc, rngs["ask"])
    if b["filter"].check(desc, turns, image) is not None:
      continue
    if exclude and image_hash(image) in exclude:
      continue
    items.append(Item(image=image, caption=desc.caption,
                      qa=tuple((t.question, t.answer) for t in turns), category=category,
                      choices=tuple(tuple((t.qa or {}).get("candidates") or ()) for t in turns),
                      object_labels=object_labels(desc, size),
                      pattern=PATTERNS.index(desc.background[1])))
  return items
