"""Next-token cross entropy on vocab-sharded logits, without gathering the vocabulary.

With the `vocab` logical axis mapped to the `tensor` mesh axis, every device holds logits
(b, s, V / t). A plain log-softmax would all-gather them to (b, s, V) on every device (for a
128k vocabulary and 4k tokens that is 2 GB of fp32 per sample). Here each device reduces its own
slice and only per-token scalars cross devices:

  m      = pmax_t(max_v x)                        (stop-gradient: only for stability)
  lse    = log(psum_t(sum_v exp(x - m))) + m
  target = psum_t(x[label - offset] if the label falls in this device's vocab slice else 0)
  nll    = lse - target

Semantics equal `fusion_jax.models.mapping_loss.cross_entropy`: HF-style unshifted labels,
logits[:, t] predict labels[:, t + 1], -100 ignored, fp32 math. The labels are shifted
instead of slicing the logits (no copy of the largest activation, and the sequence axis may be
sharded too).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fusion_jax.parallel.sharding import DEFAULT_RULES, Rules

IGNORE_INDEX = -100


def shift_labels(labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """(B, S) unshifted labels -> (B, S) targets: targets[:, t] = labels[:, t + 1], last ignored."""
  pad = jnp.full((labels.shape[0], 1), ignore_index, labels.dtype)
  return jnp.concatenate([labels[:, 1:], pad], axis=1)


def _axes_tuple(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _token_nll(logits: jax.Array, targets: jax.Array, vocab_axes: tuple[str, ...],
               vocab_size: int | None = None) -> jax.Array:
  """Per-token NLL of one vocab shard; collectives over `vocab_axes` (empty = unsharded).

  logits (b, s, v_local) any float dtype; targets (b, s) global vocab ids. Returns (b, s) fp32.
  Ignored targets give garbage values that the caller masks. Columns at or past `vocab_size`
  (padding of the LM head's width) are left out of the softmax.
  """
  x = logits.astype(jnp.float32)
  v_local = x.shape[-1]
  offset = jax.lax.axis_index(vocab_axes) * v_local if vocab_axes else 0
  if vocab_size is not None:
    x = jnp.where(offset + jnp.arange(v_local) < vocab_size, x, -jnp.inf)
  # The max only stabilises exp; stop_gradient keeps pmax out of differentiation and the
  # gradient of lse is exactly softmax(x).
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
  if vocab_axes:
    m = jax.lax.pmax(m, vocab_axes)
  sum_exp = jnp.sum(jnp.exp(x - m[..., None]), axis=-1)
  local = targets - offset
  in_shard = (local >= 0) & (local < v_local)
  picked = jnp.take_along_axis(x, jnp.clip(local, 0, v_local - 1)[..., None], axis=-1)[..., 0]
  picked = jnp.where(in_shard, picked, 0.0)
  if vocab_axes:
    sum_exp = jax.lax.psum(sum_exp, vocab_axes)
    picked = jax.lax.psum(picked, vocab_axes)
  return jnp.log(sum_exp) + m - picked


def _context_mesh(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None):
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def _nll_sum(logits: jax.Array, targets: jax.Array, mesh, rules: Rules, ignore_index: int,
             vocab_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum of token NLLs, supervised tokens) of (b, s, V) logits against (b, s) shifted targets;
  columns at or past vocab_size (if given) are padding."""
  mask = targets != ignore_index
  spec = nn.logical_to_mesh_axes(("batch", "length", "vocab"), list(rules))
  vocab_axes = _axes_tuple(spec[2])
  if mesh is None:
    nll = _token_nll(logits, targets, (), vocab_size)
  else:
    shards = 1
    for a in vocab_axes:
      shards *= mesh.shape[a]
    if logits.shape[-1] % shards:
      raise ValueError(
          f"cross_entropy: vocabulary {logits.shape[-1]} is not divisible by its {shards} "
          f"shards over mesh axes {vocab_axes}; pad the vocabulary (model config) to a "
          "multiple of the tensor axis size or change the 'vocab' rule.")
    tok = P(spec[0], spec[1])
    nll = jax.shard_map(
        lambda x, t: _token_nll(x, t, vocab_axes, vocab_size), mesh=mesh,
        in_specs=(P(spec[0], spec[1], spec[2]), tok), out_specs=tok)(logits, targets)
  total = jnp.sum(jnp.where(mask, nll, 0.0))
  return total, jnp.sum(mask).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                  rules: Rules = DEFAULT_RULES,
                  ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
  """Next-token cross entropy (sum, count) computed shard-locally over the vocabulary.

  Args:
    logits: (B, S, V) any float dtype, laid out with logical axes (batch, length, vocab).
    labels: (B, S) int, HF-style unshifted, `ignore_index` where unsupervised.
    mesh: the device mesh; default the context mesh (`jax.set_mesh`). Without any mesh the
      same math runs unsharded.
    rules: logical axis rules mapping batch / length / vocab to mesh axes.
    ignore_index: label value that is not supervised.

  Returns:
    (sum of token NLLs, number of supervised tokens), fp32 scalars.
  """
  return _nll_sum(logits, shift_labels(labels, ignore_index), _context_mesh(mesh), rules,
                  ignore_index)


def lm_head_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, *,
                          chunks: int, dtype: Any, pad_to: int = 1,
                          mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                          rules: Rules = DEFAULT_RULES, ignore_index: int = IGNORE_INDEX
                          ) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy(hidden @ kernel, labels)`, the LM head's projection included.

  chunks > 1 never holds the (B, S, V) logits (MaxText's vocab tiling): the tokens are scanned
  in `chunks` chunks and each chunk's logits are recomputed in the backward pass, so the step
  holds one (B, S / chunks, V) fp32 chunk instead of the whole logits and their gradient, for
  one more LM-head matmul forward. Chunk c holds tokens c, c + chunks, c + 2 chunks, ...: a
  strided split keeps the batch and length axes' shardings on every chunk (a sharded sequence
  axis is not resliced).

  pad_to > 1 widens the kernel with zero columns to a multiple of it (FUSION's vocabularies,
  32013 and 128258, are not multiples of 8; matrix units run aligned widths at full rate, as
  nanoGPT's and Megatron's padded vocabularies do): the padded columns are left out of the
  softmax, so the loss and gradients are those of the V real columns.

  Args:
    hidden: (B, S, D) final hidden states (after the decoder's last norm).
    kernel: (D, V) LM head (the embedding table transposed when tied), any float dtype; its
      fsdp shards are gathered once, in its own dtype, so its gradient sums the chunks there.
    labels: (B, S) int, HF-style unshifted, `ignore_index` where unsupervised.
    chunks: number of token chunks; must divide S.
    dtype: the LM head's compute dtype (logits are computed in it, then upcast, as unchunked).
    pad_to: the projection's width is padded to a multiple of this (1: V as it is).
    mesh, rules, ignore_index: as `cross_entropy`.

  Returns:
    (sum of token NLLs, number of supervised tokens), fp32 scalars.
  """
  b, s, d = hidden.shape
  if chunks < 1 or s % chunks:
    raise ValueError(f"lm_head_cross_entropy: loss_chunks={chunks} must divide the sequence "
                     f"length {s}; set --config.loss_chunks to a divisor of it (1 = unchunked)")
  mesh = _context_mesh(mesh)
  vocab = kernel.shape[1]
  pad = -vocab % pad_to

  def nll_sum(w: jax.Array, h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = w.astype(dtype)
    logits = jnp.dot(h.astype(dtype), jnp.pad(w, ((0, 0), (0, pad))) if pad else w)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"),
                                        rules=list(rules))
    return _nll_sum(logits, t, mesh, rules, ignore_index, vocab if pad else None)

  targets = shift_labels(labels, ignore_index)
  if chunks == 1:
    return nll_sum(kernel, hidden, targets)
  # Gathered once, in its own dtype, so that its gradient sums the chunks there.
  w = nn.with_logical_constraint(kernel, (None, "vocab"), rules=list(rules))

  @jax.checkpoint
  def chunk(carry, xs):
    h, t = xs
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"), rules=list(rules))
    total, count = nll_sum(w, h, t)
    return (carry[0] + total, carry[1] + count), None

  zero = jnp.zeros((), jnp.float32)
  xs = (jnp.moveaxis(hidden.reshape(b, s // chunks, chunks, d), 2, 0),
        jnp.moveaxis(targets.reshape(b, s // chunks, chunks), 2, 0))
  (total, count), _ = jax.lax.scan(chunk, (zero, zero), xs)
  return total, count
