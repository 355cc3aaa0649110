"""Dual-Supervised Semantic Mapping loss (docs/model.md §8).

  loss = CE + lambda * (text_map + vision_map),   lambda = 0.1

- CE: next-token cross entropy on fp32 logits, mean over the supervised tokens of the batch.
- text_map: mean over valid instruction tokens of 1 - cos(embed_tokens(instructs), instruction
  features from the guided vision pass).
- vision_map: mean over all B*N patches of 1 - cos(hs[0] patch embeddings, aux_projector(image
  tokens)); the original includes text-only dummy images, `sample_mask` excludes them.

Every term is per sample, so packed batches (models/batch_spec.py) pass their per-sample arrays
with the extra sample-slot axis, (B, P, T, D) and (B, P, N, Dv), and a sample mask that leaves
out the empty slots: the sums and counts are those of the same samples unpacked.

Each term is returned as (sum, count) so that gradient accumulation and cross-device
reductions can add sums and counts before dividing. Cosines follow torch's
CosineEmbeddingLoss exactly: cos = <a,b> / sqrt((|a|^2 + 1e-12) * (|b|^2 + 1e-12)), in fp32.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fusion_jax.models.lm_head import LMHead
from fusion_jax.parallel.cross_entropy import lm_head_cross_entropy
from fusion_jax.parallel.cross_entropy import cross_entropy as vocab_parallel_ce
COS_EPS = 1e-12  # ATen Loss.cpp EPSILON, added to each squared norm


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross entropy: logits[:, :-1] predict labels[:, 1:]; -100 is ignored.

  Computed shard-locally over the vocabulary when a mesh is in context (no full-logit gather);
  plain fp32 log-softmax math otherwise (fusion_jax.parallel.cross_entropy).

  Args:
    logits: (B, S, V), any float dtype (upcast to fp32).
    labels: (B, S) int, HF-style unshifted, -100 where unsupervised.

  Returns:
    (sum of token losses, number of supervised tokens), both fp32 scalars.
  """
  return vocab_parallel_ce(logits, labels)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """torch CosineEmbeddingLoss cosine over the last axis, fp32. (..., D) -> (...)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  na = jnp.sum(a * a, axis=-1) + COS_EPS
  nb = jnp.sum(b * b, axis=-1) + COS_EPS
  return dot / jnp.sqrt(na * nb)


def text_mapping_loss(instruct_embeds: jax.Array, instruct_feats: jax.Array,
                      mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum and count of (1 - cos) over valid instruction tokens.

  Args:
    instruct_embeds: (..., T, D) LLM input embeddings of the instruction tokens.
    instruct_feats: (..., T, D) instruction features from the guided vision pass.
    mask: (..., T) bool, True at valid instruction tokens.
  """
  loss = 1.0 - cosine_similarity(instruct_embeds, instruct_feats)
  return jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(mask).astype(jnp.float32)


def vision_mapping_loss(patch_embeds: jax.Array, projected_back: jax.Array,
                        sample_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum and count of (1 - cos) over patches.

  Args:
    patch_embeds: (..., N, Dv) hs[0] (patch + position embeddings) of the full image; the
      leading axes index samples ((B,) unpacked, (B, P) packed).
    projected_back: (..., N, Dv) aux_projector(image tokens).
    sample_mask: (...) bool or None. None (faithful) averages over all patches of every
      sample, dummy images of text-only samples included; a mask keeps only True samples
      (packed batches pass the filled slots, or the filled slots with an image).
  """
  n = patch_embeds.shape[-2]
  samples = math.prod(patch_embeds.shape[:-2])
  loss = 1.0 - cosine_similarity(patch_embeds, projected_back)  # (..., N)
  if sample_mask is None:
    return jnp.sum(loss), jnp.float32(samples * n)
  keep = sample_mask[..., None]
  return (jnp.sum(jnp.where(keep, loss, 0.0)),
          jnp.sum(sample_mask).astype(jnp.float32) * jnp.float32(n))


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
  # An empty term (e.g. a batch with no supervised token) contributes 0 instead of NaN.
  return total / jnp.maximum(count, 1.0)


def loss_terms(
    logits: jax.Array,
    labels: jax.Array,
    instruct_embeds: jax.Array,
    instruct_feats: jax.Array,
    instructs_mask: jax.Array,
    patch_embeds: jax.Array,
    projected_back: jax.Array,
    *,
    sample_mask: jax.Array | None = None,
    text_map: bool = True,
    vision_map: bool = True,
    rules: Any = None,
    head: LMHead | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """docs/model.md §8's terms as (sum, count): the one place the FUSION loss is assembled
  (`fusion_loss` takes their means; the trainer's FusionTask normalises the sums over the global
  batch).

  Args: as `fusion_loss`, plus
    text_map, vision_map: include that term (off: the model has no such term to train).
    rules: logical axis rules of the vocab-sharded cross entropy (None: its defaults).
    head: an LMHead: `logits` are then the decoder's final hidden states (B, S, D), which the
      loss projects itself (in head.chunks token chunks, the (B, S, V) logits never exist;
      fusion_jax.parallel.cross_entropy.lm_head_cross_entropy).

  Returns:
    {"ce": (sum, count), "text_map": ..., "vision_map": ...} (the terms asked for).
  """
  ce_kw = {} if rules is None else {"rules": rules}
  if head is None:
    terms = {"ce": vocab_parallel_ce(logits, labels, **ce_kw)}
  else:
    terms = {"ce": lm_head_cross_entropy(logits, head.kernel, labels, chunks=head.chunks,
                                         dtype=head.dtype, pad_to=head.pad_to, **ce_kw)}
  if text_map:
    terms["text_map"] = text_mapping_loss(instruct_embeds, instruct_feats, instructs_mask)
  if vision_map:
    terms["vision_map"] = vision_mapping_loss(patch_embeds, projected_back, sample_mask)
  return terms


def fusion_loss(
    logits: jax.Array,
    labels: jax.Array,
    instruct_embeds: jax.Array,
    instruct_feats: jax.Array,
    instructs_mask: jax.Array,
    patch_embeds: jax.Array,
    projected_back: jax.Array,
    *,
    sample_mask: jax.Array | None = None,
    mapping_weight: float = 0.1,
    head: LMHead | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total FUSION loss: CE + mapping_weight * (text_map + vision_map), each term a mean.

  Args:
    logits: (B, S, V); labels: (B, S) unshifted, -100 = unsupervised.
    instruct_embeds, instruct_feats: (..., T, D); instructs_mask: (..., T) bool.
    patch_embeds, projected_back: (..., N, Dv) (leading axes: samples).
    sample_mask: (...) bool keeping samples in vision_map (packed empty slots out; text-only
      samples out in the corrected option); None keeps every patch (faithful, unpacked).
    mapping_weight: lambda (0.1 in FUSION).
    head: as `loss_terms` (`logits` are then the hidden states, which the loss projects).

  Returns:
    (loss scalar fp32, aux) where aux holds the means `ce`, `text_map`, `vision_map`, and the
    raw sums/counts `ce_sum`, `num_tokens`, `text_map_sum`, `num_instruct_tokens`,
    `vision_map_sum`, `num_patches` for accumulation across micro-batches or devices.
  """
  terms = loss_terms(logits, labels, instruct_embeds, instruct_feats, instructs_mask,
                     patch_embeds, projected_back, sample_mask=sample_mask, head=head)
  (ce_sum, ce_n), (t_sum, t_n), (v_sum, v_n) = (
      terms["ce"], terms["text_map"], terms["vision_map"])
  ce, text_map, vision_map = _mean(ce_sum, ce_n), _mean(t_sum, t_n), _mean(v_sum, v_n)
  loss = ce + jnp.float32(mapping_weight) * (text_map + vision_map)
  aux = dict(ce=ce, text_map=text_map, vision_map=vision_map,
             ce_sum=ce_sum, num_tokens=ce_n, text_map_sum=t_sum, num_instruct_tokens=t_n,
             vision_map_sum=v_sum, num_patches=v_n)
  return loss, aux
