"""Named FUSION model presets (paper variants, docs/model.md §2) and a tiny one for tests.

Vocabulary sizes are the authors' after adding `<vision_start>` / `<vision_end>` and resizing
to the tokenizer length (Phi-3.5: 32011 + 2; Llama-3.1: 128256 + 2). Importing a checkpoint
always takes the vocabulary from its stored embedding shape.
"""
from __future__ import annotations

import dataclasses

from fusion_jax.models import query_len
from fusion_jax.models.fusion import FusionConfig
from fusion_jax.models.llm_config import LLAMA_3_1_8B, PHI_3_5_MINI, LLMConfig
from fusion_jax.models.vision import (SIGLIP2_GIANT_OPT_16_384, SIGLIP_SO400M_14_384, VisionConfig,
                                      fusion_tower)

# Paper interaction schedule: 10 layers after decoder layers 0, 3, ..., 27; window 3.
_PAPER = dict(query_len=query_len.CANDIDATES, window_size=3, num_interaction=10,
              interaction_start=0, interaction_stride=3, interaction_heads=16)

_PHI = PHI_3_5_MINI.replace(vocab_size=32013)
_LLAMA = LLAMA_3_1_8B.replace(vocab_size=128258)

FUSION_3B = FusionConfig(llm=_PHI, vision=fusion_tower(SIGLIP_SO400M_14_384), template="phi_3",
                         **_PAPER)
FUSION_8B = FusionConfig(llm=_LLAMA, vision=fusion_tower(SIGLIP_SO400M_14_384),
                         template="llama_3", **_PAPER)
FUSION_X_3B = FusionConfig(llm=_PHI, vision=fusion_tower(SIGLIP2_GIANT_OPT_16_384),
                           template="phi_3", **_PAPER)
FUSION_X_8B = FusionConfig(llm=_LLAMA, vision=fusion_tower(SIGLIP2_GIANT_OPT_16_384),
                           template="llama_3", **_PAPER)
# FUSION-L: FUSION-X with the image token grid resized at inference (authors: 12 x 12).
FUSION_L_3B = dataclasses.replace(FUSION_X_3B, fusion_l_grid=12)
FUSION_L_8B = dataclasses.replace(FUSION_X_8B, fusion_l_grid=12)

# Tiny: every mechanism on, shapes small enough for CPU tests (N = 16 patches, mosaic 8 x 8).
TINY = FusionConfig(
    llm=LLMConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=512, pad_token_id=0, dtype="float32"),
    vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=3, num_heads=2, dtype="float32"),
    query_len=(1, 4), window_size=3, num_interaction=2, interaction_start=0,
    interaction_stride=2, interaction_heads=4, max_instruct_len=16, template="llama_3")

PRESETS: dict[str, FusionConfig] = {
    "fusion_3b": FUSION_3B, "fusion_8b": FUSION_8B, "fusion_x_3b": FUSION_X_3B,
    "fusion_x_8b": FUSION_X_8B, "fusion_l_3b": FUSION_L_3B, "fusion_l_8b": FUSION_L_8B,
    "tiny": TINY,
}


def get_preset(name: str, **overrides) -> FusionConfig:
  """Preset by name with field overrides; a clear error lists the names."""
  if name not in PRESETS:
    raise ValueError(f"unknown FUSION preset {name!r}; choose one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)
