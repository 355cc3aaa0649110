"""The FUSION language model: one Linen decoder for Llama-3.1 and Phi-3.5 (pre-norm, RMSNorm,
SwiGLU, rotary attention with grouped-query heads).

Parameter tree (unscanned; conversion to and from transformers is a rename, see
fusion_jax/convert/hf_llm.py):

  embed_tokens/embedding                       (V, D)        ('vocab', 'embed')
  layers_{i}/input_layernorm/scale             (D,)          ('norm',)
  layers_{i}/self_attn/q_proj/kernel           (D, H, hd)    ('embed', 'heads', 'head_dim')
  layers_{i}/self_attn/{k,v}_proj/kernel       (D, KV, hd)   ('embed', 'kv_heads', 'head_dim')
  layers_{i}/self_attn/o_proj/kernel           (H, hd, D)    ('heads', 'head_dim', 'embed')
  layers_{i}/post_attention_layernorm/scale    (D,)
  layers_{i}/mlp/{gate,up}_proj/kernel         (D, F)        ('embed', 'mlp')
  layers_{i}/mlp/down_proj/kernel              (F, D)        ('mlp', 'embed')
  norm/scale                                   (D,)
  lm_head/kernel                               (D, V)        ('embed', 'vocab')  (absent if tied)

With `scan_layers=True` the layers are one `layers` subtree whose leaves carry a leading
('layers',) axis; `stack_layers` / `unstack_layers` convert between the two layouts. With
blocks between layers the scanned stack is segmented (below); fusion_jax.models.param_layout
converts a whole FUSION tree between layouts.

Calling convention (pure functional, `apply(..., method=...)`):
  Decoder.embed(input_ids (B, S)) -> (B, S, D)
  Decoder.__call__(inputs_embeds (B, S, D), positions (B, S), token_mask (B, S), *,
                   cache=None, hook=None) -> (hidden (B, S, D) after the final norm, new_cache)
  Decoder.logits(hidden (B, S, D)) -> (B, S, V) float32
  (a loss that projects the hidden states itself reads the same weight: models/lm_head.py)
  Decoder.forward(input_ids, positions, token_mask, *, cache=None) -> (logits, new_cache)

Blocks between layers (FUSION's interaction layers) come in two forms:
  - unscanned: `hook(layer_index, h) -> h` runs after decoder layer i; it may call Linen
    submodules of the module that owns the Decoder (their parameters live under that owner);
  - scanned: the Decoder is built with `hook_layers` (evenly spaced layer indices) and a
    `hook_block` factory; the stack is cut into segments (`layer_plan`) and each block runs
    inside the scanned body of its group, after the group's last layer:
      head    layers 0..hook_layers[0], then block 0           head/{layers (n0,...), block}
      groups  G x (stride layers, then a block)                groups/{layers (G, stride, ...),
                                                                       block (G, ...)}
      tail    the layers after the last block                  tail (nt, ...)
    `__call__(..., hook_ctx=ctx)` hands ctx (any pytree, broadcast to every group) to
    `block.refine(h, ctx) -> h`; hook_ctx=None skips the blocks (single-token decode).
    Compile time and program size then grow with the number of segments, not with depth.

KV cache (generation): `init_cache(cfg, batch, max_len)` gives
  {'k', 'v': per layer (B, max_len, KV, hd) — a tuple of L arrays, or one (L, B, max_len, KV, hd)
   array when scan_layers — 'valid': (B, max_len) bool, 'index': (B,) int32 next write slot}.
A call with a cache writes its S new keys/values at slots index[b] .. index[b]+S-1 of example b,
marks them valid where token_mask is True, and advances index[b] by the number of real tokens.
Queries attend to valid slots at or before their own slot. So a right-padded prompt batch is
prefilled with one call (index 0) and every decode step (S = 1) writes at each example's own
length, overwriting that example's padding slots. Shapes are static; callers keep
index + S <= max_len (dynamic_update_slice clamps out-of-range writes). LongRoPE picks its
factor set per call from the largest position in the call (transformers' rule); keys already
cached keep their rotation, so generation that crosses original_max_position_embeddings should
re-prefill, as transformers does (see fusion_jax.models.rope.longrope_is_long).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fusion_jax.parallel import remat as remat_lib
from fusion_jax.models import attention_kernels
from fusion_jax.models.attention import dot_product_attention
from fusion_jax.models.layers import DenseGeneral
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.models.rope import RopeTables, apply_rope, make_rope_tables, rope_cos_sin
from fusion_jax.parallel.sharding import constrain

Hook = Callable[[int, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def rope_tables(cfg: LLMConfig) -> RopeTables:
  """The config's static RoPE constants (numpy; computed once per config)."""
  return make_rope_tables(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)


def _init(cfg: LLMConfig, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32 (as transformers' LlamaRMSNorm / Phi3RMSNorm)."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


def _write_slots(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """buf (B, M, ...) <- new (B, S, ...) at per-example slot index (B,)."""
  def one(b, n, i):
    return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (i,) + (0,) * (b.ndim - 1))
  return jax.vmap(one)(buf, new, index)


class SelfAttention(nn.Module):
  """Rotary grouped-query self-attention with an optional per-layer KV cache.

  Without a cache, `mask` is attention_kernels.Segments ((B, S) int32 segment ids, causal
  within a segment, 0 = padding; optional (B,) lengths) and the kernel is cfg.attention_impl (fusion_jax.models.attention_kernels); with a cache it
  is the dense (B, 1, S, M) bool mask of `_cache_mask` and the XLA path runs.
  """
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               write_index: jax.Array | None, kv: dict[str, jax.Array] | None):
    """x (B, S, D) -> ((B, S, D), new kv {'k','v': (B, M, KV, hd)} or None)."""
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    proj = functools.partial(DenseGeneral, axis=-1, use_bias=False, dtype=dt, param_dtype=pdt,
                             kernel_init=nn.initializers.normal(cfg.initializer_range))
    q = proj((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), name="q_proj")(x)
    k = proj((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)
    v = proj((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)
    q = checkpoint_name(q, remat_lib.QUERY_PROJ)
    k = checkpoint_name(k, remat_lib.KEY_PROJ)
    v = checkpoint_name(v, remat_lib.VALUE_PROJ)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_kv = None
    if kv is not None:
      # Keys are cached after rotation, so slots need not equal positions.
      k = constrain(_write_slots(kv["k"], k, write_index), ("batch", "length", "kv_heads", "head_dim"))
      v = constrain(_write_slots(kv["v"], v, write_index), ("batch", "length", "kv_heads", "head_dim"))
      new_kv = {"k": k, "v": v}
      k, v = k.astype(dt), v.astype(dt)
      out = dot_product_attention(q, k, v, mask)
    else:
      out = attention_kernels.causal_attention(q, k, v, mask.ids, lengths=mask.lengths,
                                               impl=cfg.attention_impl)
    out = checkpoint_name(out, remat_lib.ATTN_OUT)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    y = DenseGeneral(cfg.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=False,
                     dtype=dt, param_dtype=pdt, kernel_init=nn.initializers.normal(cfg.initializer_range),
                     name="o_proj")(out)
    return y, new_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = functools.partial(nn.Dense, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype))
    gate = dense(cfg.intermediate_size, kernel_init=_init(cfg, ("embed", "mlp")), name="gate_proj")(x)
    up = dense(cfg.intermediate_size, kernel_init=_init(cfg, ("embed", "mlp")), name="up_proj")(x)
    h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    h = checkpoint_name(h, remat_lib.MLP_HIDDEN)
    return dense(cfg.hidden_size, kernel_init=_init(cfg, ("mlp", "embed")), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block: h + attn(norm(h)); h + mlp(norm(h)).

  Signature is nn.scan-ready: carry `h` first, then broadcast inputs, then the scanned per-layer
  cache; returns (carry, per-layer output).
  """
  cfg: LLMConfig

  @nn.compact
  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               write_index: jax.Array | None, kv: dict[str, jax.Array] | None):
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
    a, new_kv = SelfAttention(cfg, name="self_attn")(
        norm(name="input_layernorm")(h), cos, sin, mask, write_index, kv)
    h = constrain(h + a, ("batch", "length", "embed"))
    h = h + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(h))
    return constrain(h, ("batch", "length", "embed")), new_kv


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Segments of a scanned stack with blocks after `hook_layers` (see the module docstring)."""
  head: int     # layers before and including hook_layers[0] (0 = no blocks at all)
  stride: int   # layers per group
  groups: int   # groups after the head, each ending with a block
  tail: int     # layers after the last block

  @property
  def segments(self) -> tuple[tuple[str, int], ...]:
    """(name, layer count) in order, empty segments left out."""
    segs = (("head", self.head), ("groups", self.groups * self.stride), ("tail", self.tail))
    return tuple((n, c) for n, c in segs if c)


def layer_plan(num_layers: int, hook_layers: tuple[int, ...]) -> LayerPlan:
  """Cuts L layers into head / groups / tail around evenly spaced hook layers."""
  hooks = tuple(hook_layers)
  if not hooks:
    return LayerPlan(0, 1, 0, num_layers)
  stride = hooks[1] - hooks[0] if len(hooks) > 1 else 1
  expected = tuple(hooks[0] + j * stride for j in range(len(hooks)))
  if hooks != expected or stride < 1 or hooks[0] < 0 or hooks[-1] >= num_layers:
    raise ValueError(f"layer_plan: scanned blocks need evenly spaced layers in [0, {num_layers}), "
                     f"got {hooks}; set scan_layers=False for irregular schedules")
  return LayerPlan(hooks[0] + 1, stride, len(hooks) - 1, num_layers - 1 - hooks[-1])


def _layer_scan(block: type[nn.Module], cfg: LLMConfig, length: int, name: str | None = None,
                axis_name: str = "layers") -> nn.Module:
  """`length` decoder layers as one nn.scan over stacked params (carry h, scanned kv)."""
  return nn.scan(
      block, variable_axes={"params": 0}, split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
      length=length, metadata_params={nn.PARTITION_NAME: axis_name})(cfg, name=name)


class _HookedGroup(nn.Module):
  """`n` scanned decoder layers, then one block (`block.refine(h, ctx)`) unless ctx is None."""
  cfg: LLMConfig
  n: int
  hook_block: Any

  @nn.compact
  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               write_index: jax.Array | None, ctx: Any, kv: dict[str, jax.Array] | None):
    block = remat_lib.remat(DecoderLayer, self.cfg.remat_policy, prevent_cse=False)
    h, new_kv = _layer_scan(block, self.cfg, self.n, name="layers")(h, cos, sin, mask,
                                                                    write_index, kv)
    if ctx is not None:
      h = constrain(self.hook_block(name="block").refine(h, ctx), ("batch", "length", "embed"))
    return h, new_kv


class Decoder(nn.Module):
  """Token embedding, L decoder layers, final RMSNorm and LM head (see module docstring).

  hook_layers / hook_block: scanned stacks only; blocks after those layers (FUSION's
  interaction layers). hook_block() builds the block module (it must have `refine(h, ctx)`).
  """
  cfg: LLMConfig
  hook_layers: tuple[int, ...] = ()
  hook_block: Any = None

  @property
  def plan(self) -> LayerPlan:
    return layer_plan(self.cfg.num_layers, self.hook_layers)

  def setup(self):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                 embedding_init=_init(cfg, ("vocab", "embed")))
    if self.hook_layers and not cfg.scan_layers:
      raise ValueError("Decoder: hook_layers/hook_block are for scanned stacks; pass `hook` to "
                       "__call__ for the unrolled loop")
    # inside nn.scan the scan itself stops CSE across the remat boundary.
    block = remat_lib.remat(DecoderLayer, cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers and self.hook_layers:
      plan = self.plan
      self.head = _HookedGroup(cfg, plan.head, self.hook_block)
      if plan.groups:
        self.groups = nn.scan(
            _HookedGroup, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 5 + (0,), length=plan.groups,
            metadata_params={nn.PARTITION_NAME: "layer_groups"})(cfg, plan.stride, self.hook_block)
      if plan.tail:
        self.tail = _layer_scan(block, cfg, plan.tail)
    elif cfg.scan_layers:
      self.layers = _layer_scan(block, cfg, cfg.num_layers)
    else:
      # A list attribute names its modules layers_0 .. layers_{L-1}.
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                              kernel_init=_init(cfg, ("embed", "vocab")))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, S) int -> (B, S, D) compute dtype."""
    # Gather the fsdp shards of the table first (as FSDP does for every weight): a lookup into
    # a table split on its embed axis cannot produce batch-sharded rows without replicating.
    table = constrain(jnp.asarray(self.embed_tokens.embedding, jnp.dtype(self.cfg.dtype)),
                      ("vocab", None))
    return constrain(jnp.take(table, input_ids, axis=0), ("batch", "length", "embed"))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(B, S, D) -> (B, S, V) float32 (the loss wants fp32 logits)."""
    if self.cfg.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, token_mask: jax.Array, *,
               cache: dict[str, Any] | None = None, hook: Hook | None = None,
               hook_ctx: Any = None, segment_ids: jax.Array | None = None,
               prefix_rows: bool = False, samples_per_row: int = 1):
    """(B, S, D) embeddings -> (hidden (B, S, D) after the final norm, new cache or None).

    segment_ids: (B, S) int32 for packed rows (causal attention within a segment, 0 =
    padding); None = one segment per row. Ignored with a cache.
    prefix_rows: the rows follow the batch contract (each of a row's `samples_per_row` sample
    slots holds its tokens contiguously from the row start, segment ids 1, 2, ..., padding
    after): the cuDNN kernel then takes sequence lengths (one sample per row) or per-slot
    lengths (packed rows) instead of a mask. Static, as is samples_per_row.

    hook: unrolled stacks; hook_ctx: scanned stacks built with hook_layers (module docstring).
    """
    cfg = self.cfg
    if hook is not None and cfg.scan_layers:
      raise ValueError("Decoder: a per-layer hook callable needs scan_layers=False; scanned "
                       "stacks take blocks as Decoder(hook_layers=..., hook_block=...) and "
                       "__call__(hook_ctx=...)")
    if self.is_initializing():
      # Create every parameter whatever entry point init uses.
      self.logits(self.embed(jnp.zeros((1, 1), jnp.int32)))
    token_mask = token_mask.astype(jnp.bool_)
    h = constrain(inputs_embeds.astype(jnp.dtype(cfg.dtype)), ("batch", "length", "embed"))
    cos, sin = rope_cos_sin(rope_tables(cfg), positions)
    if cache is None:
      ids = attention_kernels.segment_ids_from(token_mask, segment_ids)
      lengths = None
      if prefix_rows and samples_per_row == 1:
        lengths = token_mask.sum(axis=-1).astype(jnp.int32)
      elif prefix_rows:
        lengths = attention_kernels.slot_lengths(ids, samples_per_row)
      mask = attention_kernels.Segments(ids, lengths)
      write_index, new_meta = None, None
    else:
      mask, write_index, new_meta = _cache_mask(cache, token_mask)

    if cfg.scan_layers and self.hook_layers:
      h, new_kv = self._segments(h, cos, sin, mask, write_index, hook_ctx, cache)
    elif cfg.scan_layers:
      kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
      h, new_kv = self.layers(h, cos, sin, mask, write_index, kv)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
        h, kv = layer(h, cos, sin, mask, write_index, kv)
        if kv is not None:
          new_k.append(kv["k"])
          new_v.append(kv["v"])
        if hook is not None:
          h = constrain(hook(i, h), ("batch", "length", "embed"))
      new_kv = None if cache is None else {"k": tuple(new_k), "v": tuple(new_v)}
    h = self.norm(h)
    new_cache = None if cache is None else {**new_kv, **new_meta}
    return constrain(h, ("batch", "length", "embed")), new_cache

  def _segments(self, h, cos, sin, mask, write_index, ctx, cache):
    """Runs head / groups / tail; the stacked (L, ...) cache is cut to match and rejoined."""
    plan = self.plan
    kvs: dict[str, Any] = {}
    if cache is not None:
      start = 0
      for name, count in plan.segments:
        part = {k: cache[k][start:start + count] for k in ("k", "v")}
        if name == "groups":
          part = jax.tree.map(lambda x: x.reshape(plan.groups, plan.stride, *x.shape[1:]), part)
        kvs[name] = part
        start += count
    new: dict[str, Any] = {}
    h, new["head"] = self.head(h, cos, sin, mask, write_index, ctx, kvs.get("head"))
    if plan.groups:
      h, new["groups"] = self.groups(h, cos, sin, mask, write_index, ctx, kvs.get("groups"))
    if plan.tail:
      h, new["tail"] = self.tail(h, cos, sin, mask, write_index, kvs.get("tail"))
    if cache is None:
      return h, None
    parts = [jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), new[n]) if n == "groups"
             else new[n] for n, _ in plan.segments]
    return h, {k: jnp.concatenate([p[k] for p in parts], axis=0) for k in ("k", "v")}

  def forward(self, input_ids: jax.Array, positions: jax.Array, token_mask: jax.Array, *,
              cache: dict[str, Any] | None = None, hook: Hook | None = None):
    """Token ids -> (logits (B, S, V) float32, new cache or None)."""
    h, new_cache = self(self.embed(input_ids), positions, token_mask, cache=cache, hook=hook)
    return self.logits(h), new_cache

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
    """Empty cache for this decoder's config (works on an unbound module)."""
    return init_cache(self.cfg, batch, max_len, dtype)


def _cache_mask(cache: Mapping[str, Any], token_mask: jax.Array):
  """Attention mask (B, 1, S, M), write slots (B,) and the cache's new 'valid'/'index'."""
  index = cache["index"].astype(jnp.int32)
  valid = _write_slots(cache["valid"], token_mask, index)
  m = valid.shape[1]
  s = token_mask.shape[1]
  q_slot = index[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # (B, S)
  allowed = jnp.arange(m, dtype=jnp.int32)[None, None, :] <= q_slot[:, :, None]  # (B, S, M)
  mask = (allowed & valid[:, None, :])[:, None]
  new_index = index + token_mask.sum(axis=-1).astype(jnp.int32)
  return mask, index, {"valid": valid, "index": new_index}


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
  """Empty KV cache: k/v zeros (per layer (B, max_len, KV, hd)), valid all False, index 0.

  dtype defaults to the compute dtype. With scan_layers the per-layer arrays are stacked on a
  leading layer axis (what nn.scan consumes); otherwise they are a tuple of L arrays.
  """
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    k = jnp.zeros((cfg.num_layers,) + shape, dtype)
    v = jnp.zeros((cfg.num_layers,) + shape, dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), jnp.bool_),
          "index": jnp.zeros((batch,), jnp.int32)}


def cache_logical_axes(cfg: LLMConfig) -> dict[str, Any]:
  """Logical PartitionSpecs matching `init_cache(cfg, ...)` (for shardings of a donated cache)."""
  P = jax.sharding.PartitionSpec
  per = ("batch", "length", "kv_heads", "head_dim")
  if cfg.scan_layers:
    kv = P("layers", *per)
    k, v = kv, kv
  else:
    k = tuple(P(*per) for _ in range(cfg.num_layers))
    v = tuple(P(*per) for _ in range(cfg.num_layers))
  return {"k": k, "v": v, "valid": P("batch", "length"), "index": P("batch")}


# ---------------------------------------------------------------------------------------------
# Layer layout helpers
# ---------------------------------------------------------------------------------------------


def _stack(xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def stack_layers(params: Mapping[str, Any], num_layers: int | None = None) -> dict[str, Any]:
  """Unscanned params (layers_0 .. layers_{L-1}) -> scanned layout (one stacked `layers`).

  Works on the bare params tree; other entries are kept. Numpy in, numpy out.
  """
  keys = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  if num_layers is not None and len(keys) != num_layers:
    raise ValueError(f"stack_layers: found {len(keys)} layers_i entries, expected {num_layers}")
  if [int(k.split("_")[1]) for k in keys] != list(range(len(keys))):
    raise ValueError(f"stack_layers: layer entries are not contiguous from 0: {keys}")
  if not keys:
    raise ValueError("stack_layers: no layers_i entries (already stacked?)")
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: _stack(xs), *[params[k] for k in keys])
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned params (`layers` with a leading layer axis) -> layers_0 .. layers_{L-1}."""
  if "layers" not in params:
    raise ValueError("unstack_layers: no stacked 'layers' entry (already unstacked?)")
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out
