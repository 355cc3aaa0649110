"""The LM head as the training loss sees it: its (D, V) weight read from the parameter tree, and
the LMHead the loss projects the decoder's final hidden states with
(fusion_jax.parallel.cross_entropy.lm_head_cross_entropy: token chunks, padded width)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusion_jax.models import attention_kernels
from fusion_jax.models.llm_config import LLMConfig


class LMHead(NamedTuple):
  """The LM head, for a loss that projects the decoder's final hidden states itself
  (fusion_jax.parallel.cross_entropy.lm_head_cross_entropy)."""
  kernel: jax.Array  # (D, V): lm_head's kernel, or the tied embedding table transposed
  dtype: Any         # compute dtype of the projection (logits upcast to fp32 after it)
  chunks: int = 1    # token chunks, each recomputed in the backward pass (config.loss_chunks)
  pad_to: int = 1    # the projection's width padded to a multiple of this (masked in the loss)


# On GPU and TPU the training loss pads the LM head's width to a multiple of this (FUSION's
# vocabularies, 32013 and 128258, are not multiples of 8; matrix units run aligned widths at full
# rate). The padded columns are left out of the softmax
# (fusion_jax.parallel.cross_entropy.lm_head_cross_entropy).
LOSS_VOCAB_PAD = 128


def loss_vocab_pad(backend: str | None = None) -> int:
  """The multiple the training loss pads the LM head's width to: LOSS_VOCAB_PAD on GPU and TPU
  (default: the backend being traced for, AOT targets included), 1 on CPU, where it would only
  add work."""
  backend = backend or attention_kernels.traced_backend()
  return LOSS_VOCAB_PAD if backend in ("gpu", "cuda", "rocm", "tpu") else 1


def lm_head_kernel(params: Mapping[str, Any], cfg: LLMConfig) -> jax.Array:
  """The (D, V) weight `Decoder.logits` multiplies by (in the compute dtype): lm_head's kernel,
  or the embedding table transposed when the two are tied. `params` is the decoder's tree,
  boxed (nn.Partitioned, as init returns it) or not, as apply accepts it."""
  if cfg.tie_word_embeddings:
    return jnp.transpose(nn.meta.unbox(params["embed_tokens"]["embedding"]))
  return nn.meta.unbox(params["lm_head"]["kernel"])
