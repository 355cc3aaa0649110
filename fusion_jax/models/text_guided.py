"""Text-Guided Unified Vision Encoding (docs/model.md §4).

The instruction states (aux_projector(embed_tokens(instructs)), width Dv) are appended after
the N patch embeddings and the tower runs over all N + T tokens. Text tokens get no position
embedding. Padded text keys are masked in every layer. The attention rule differs between
early layers (index < k = floor(L'/2)) and late layers:

  mode                    early layers                                     late layers
  faithful (default)      text query rows: uniform over ALL N+T keys,       all queries see
                          padding included (the authors' code sets every    vision + valid
                          score of those rows to the dtype minimum);        text
                          vision queries: vision + valid text
  block_vision_to_text    vision queries: vision keys only;                 same
                          text queries: vision + valid text

`faithful` reproduces released checkpoints; `block_vision_to_text` is the stated intent
(config flag `vision_text_mask`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fusion_jax.models.connector import connector_k
from fusion_jax.models.vision import LayerMask, LayerMasks, VisionTower

MODES: tuple[str, ...] = ("faithful", "block_vision_to_text")


def text_guided_layer_masks(num_patches: int, text_mask: jax.Array, num_layers: int,
                            mode: str = "faithful") -> LayerMasks:
  """Per-layer attention rules over N patches followed by T text tokens.

  Args:
    num_patches: N.
    text_mask: (B, T) bool, True at valid instruction tokens.
    num_layers: L', the layers the tower runs (k = floor(L'/2) early layers).
    mode: 'faithful' or 'block_vision_to_text'.

  Returns:
    `i -> (mask bool broadcastable to (B, 1, M, M), uniform_rows (B, M) bool | None)` for
    VisionTower.encode; mask is (B, 1, 1, M) except block mode's early layers (B, 1, M, M).
  """
  if mode not in MODES:
    raise ValueError(f"text_guided: unknown vision_text_mask mode {mode!r}; choose from {MODES}")
  b, t = text_mask.shape
  n = num_patches
  m = n + t
  k = connector_k(num_layers)
  key_valid = jnp.concatenate([jnp.ones((b, n), jnp.bool_), text_mask.astype(jnp.bool_)], axis=1)
  is_text = jnp.arange(m) >= n  # (M,)
  # Key-padding rules stay (B, 1, 1, M) (broadcast inside attention): no (B, M, M) array to
  # keep alive across remat boundaries unless a rule really depends on the query.
  late_mask = key_valid[:, None, None, :]
  late: LayerMask = (late_mask, None)
  if mode == "faithful":
    # Text rows (padded ones too) ignore scores and mask: uniform over all M keys.
    early: LayerMask = (late_mask, jnp.broadcast_to(is_text[None], (b, m)))
  else:
    vision_sees_text = ~is_text[:, None] & is_text[None, :]  # (M query, M key)
    early = (late_mask & ~vision_sees_text[None, None], None)

  return LayerMasks(early, late, k)


def text_guided_encode(tower: VisionTower, patch_embeds: jax.Array, text_states: jax.Array | None,
                       text_mask: jax.Array | None = None,
                       mode: str = "faithful") -> list[jax.Array]:
  """Runs the tower over patches + instruction states.

  Args:
    tower: a bound VisionTower (a submodule inside a parent's compact/setup, or `.bind(...)`).
    patch_embeds: (B, N, Dv) hs[0] of the image (tower.embed(pixels), position embeddings in).
    text_states: (B, T, Dv) instruction states (no position embedding), or None for the plain
      tower (tiles are encoded without guidance).
    text_mask: (B, T) bool, True at valid instruction tokens; None = all valid.
    mode: 'faithful' | 'block_vision_to_text' (see the module docstring).

  Returns:
    [hs0, ..., hsL'], each (B, N + T, Dv) ((B, N, Dv) when text_states is None). Tokens
    [:, :N] are the image's, [:, N:] the instruction features.
  """
  if text_states is None:
    return tower.encode(patch_embeds)
  x, masks = _guided_inputs(tower, patch_embeds, text_states, text_mask, mode)
  return tower.encode(x, masks)


def text_guided_features(tower: VisionTower, patch_embeds: jax.Array, text_states: jax.Array,
                         text_mask: jax.Array | None = None, mode: str = "faithful") -> jax.Array:
  """feature_connector(text_guided_encode(...)) without keeping every hidden state when the
  tower is scanned: (B, N + T, 3Dv)."""
  x, masks = _guided_inputs(tower, patch_embeds, text_states, text_mask, mode)
  return tower.features(x, masks)


def _guided_inputs(tower: VisionTower, patch_embeds: jax.Array, text_states: jax.Array,
                   text_mask: jax.Array | None, mode: str) -> tuple[jax.Array, LayerMasks]:
  """(B, N + T, Dv) tower input and the per-layer rules; checks shapes."""
  b, n, dv = patch_embeds.shape
  if text_states.shape[0] != b or text_states.shape[2] != dv:
    raise ValueError(f"text_guided: text_states {text_states.shape} do not match patch_embeds "
                     f"{patch_embeds.shape} in batch or width; project instructions with "
                     "aux_projector to the tower width first")
  if text_mask is None:
    text_mask = jnp.ones(text_states.shape[:2], jnp.bool_)
  if text_mask.shape != text_states.shape[:2]:
    raise ValueError(f"text_guided: text_mask {text_mask.shape} != text_states (B, T) "
                     f"{text_states.shape[:2]}")
  x = jnp.concatenate([patch_embeds, text_states.astype(patch_embeds.dtype)], axis=1)
  return x, text_guided_layer_masks(n, text_mask, tower.config.num_layers, mode)
