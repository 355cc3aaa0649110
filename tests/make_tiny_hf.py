"""Tiny random transformers checkpoints for parity and import tests (no hub access).

Importable: `make_tiny_llama(dir)`, `make_tiny_phi3(dir)`, `make_tiny_siglip(dir)` each build a
small random torch model with transformers, perturb its weights so that every tensor matters
(default inits leave norms at exactly 1 and logits near 0, which would hide layout bugs), and
`save_pretrained` it as safetensors. Script:

  python tests/make_tiny_hf.py OUT_DIR

writes llama/, llama_noscale/, llama_sharded/ (several safetensors shards + index), phi3/ and
siglip/ under OUT_DIR.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Tiny LongRoPE factor lists (head_dim 16 -> 8 factors), deliberately uneven so that the short and
# long regimes give different logits.
PHI3_SHORT_FACTOR = (1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0)
PHI3_LONG_FACTOR = (1.1, 1.4, 2.0, 3.5, 6.0, 10.0, 16.0, 24.0)
# Tiny original context so that tests cover both regimes with short sequences.
PHI3_ORIGINAL_MAX = 32


def _perturb(model, seed: int, scale: float = 0.08) -> None:
  """Random weights with O(1) logits: normal(scale) matrices, 1 + noise norm scales."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1 and ("norm" in name or "layernorm" in name):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:  # biases
        p.copy_(0.05 * noise)
      else:
        p.copy_(scale * noise)


def make_tiny_llama(directory: str, rope_scaling: bool | dict | None = True, gqa: bool = True,
                    num_layers: int = 2, seed: int = 0, max_shard_size: int | str | None = None,
                    tie_word_embeddings: bool = False):
  """Tiny LlamaForCausalLM (D 64, 4 heads, 2 kv heads with gqa, vocab 128) saved to `directory`.

  rope_scaling: True = llama3 scaling with a tiny original context (32) so that all three
  frequency bands (kept, interpolated, divided) occur; None/False = plain RoPE; a dict is used
  as given. tie_word_embeddings: lm_head shares embed_tokens (no lm_head.weight is saved).
  Returns the torch model (float32, eval mode).
  """
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  if rope_scaling is True:
    rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  elif rope_scaling is False:
    rope_scaling = None
  params = dict(rope_theta=500000.0)
  if rope_scaling:
    params.update(rope_scaling)
  else:
    params["rope_type"] = "default"
  cfg = LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=16,
      max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=params,
      tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
      attention_bias=False, mlp_bias=False)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(cfg).eval().float()
  _perturb(model, seed)
  _save(model, directory, max_shard_size)
  return model


def make_tiny_phi3(directory: str, longrope: bool = True, num_layers: int = 2, seed: int = 1,
                   max_shard_size: int | str | None = None):
  """Tiny Phi3ForCausalLM (D 64, 4 heads MHA, fused qkv/gate_up, vocab 128) saved to `directory`.

  longrope: LongRoPE with PHI3_SHORT_FACTOR / PHI3_LONG_FACTOR, original max 32 and max 128
  (so the attention factor is sqrt(1 + ln 4 / ln 32)). Returns the torch model.
  """
  import torch
  from transformers import Phi3Config, Phi3ForCausalLM
  params: dict = {"rope_theta": 10000.0}
  if longrope:
    params.update(rope_type="longrope", short_factor=list(PHI3_SHORT_FACTOR),
                  long_factor=list(PHI3_LONG_FACTOR))
  else:
    params["rope_type"] = "default"
  cfg = Phi3Config(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
      original_max_position_embeddings=PHI3_ORIGINAL_MAX, rms_norm_eps=1e-5,
      rope_parameters=params, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, sliding_window=None)
  torch.manual_seed(seed)
  model = Phi3ForCausalLM(cfg).eval().float()
  _perturb(model, seed)
  _save(model, directory, max_shard_size)
  return model


def make_tiny_siglip(directory: str, num_layers: int = 3, seed: int = 2,
                     max_shard_size: int | str | None = None):
  """Tiny SiglipVisionModel (image 32, patch 8 -> 16 patches, D 48, 4 heads, MLP 80)."""
  import torch
  from transformers import SiglipVisionConfig, SiglipVisionModel
  cfg = SiglipVisionConfig(
      hidden_size=48, intermediate_size=80, num_hidden_layers=num_layers, num_attention_heads=4,
      num_channels=3, image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6)
  torch.manual_seed(seed)
  model = SiglipVisionModel(cfg).eval().float()
  _perturb(model, seed)
  _save(model, directory, max_shard_size)
  return model


def _save(model, directory: str, max_shard_size: int | str | None) -> None:
  os.makedirs(directory, exist_ok=True)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(directory, safe_serialization=True, **kwargs)


def make_all(out_dir: str) -> dict[str, str]:
  """Writes every tiny checkpoint under `out_dir`; returns {name: directory}."""
  dirs = {
      "llama": os.path.join(out_dir, "llama"),
      "llama_noscale": os.path.join(out_dir, "llama_noscale"),
      "llama_sharded": os.path.join(out_dir, "llama_sharded"),
      "phi3": os.path.join(out_dir, "phi3"),
      "siglip": os.path.join(out_dir, "siglip"),
  }
  make_tiny_llama(dirs["llama"])
  make_tiny_llama(dirs["llama_noscale"], rope_scaling=None, gqa=False, seed=3)
  make_tiny_llama(dirs["llama_sharded"], max_shard_size="40KB", seed=4)
  make_tiny_phi3(dirs["phi3"])
  make_tiny_siglip(dirs["siglip"])
  return dirs


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) != 1:
    print("usage: python tests/make_tiny_hf.py OUT_DIR", file=sys.stderr)
    return 2
  for name, d in make_all(argv[0]).items():
    print(f"{name}: {d} ({', '.join(sorted(os.listdir(d)))})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
