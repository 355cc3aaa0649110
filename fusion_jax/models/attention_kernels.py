"""Attention kernels. The vision tower's (`full_attention`: unmasked or key lengths;
`key_padding_attention`: the text-guided image's rule) follow `VisionConfig.attention_impl`
(auto | xla | cudnn | splash) and are described there. The LLM decoder's causal
self-attention (training, cache-less forward) is chosen by `LLMConfig.attention_impl`:

  xla     fusion_jax.models.attention.dot_product_attention with a (B, 1, S, S) segment mask:
          float32 scores (B, H, S, S) are materialised (2 GiB per 4k row per layer at 32 heads).
  splash  TPU Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention):
          causal mask + segment ids, block-sparse (fully masked blocks are skipped), grouped
          kv heads handled by the kernel; vmapped over the batch. Off TPU it runs in Pallas
          interpret mode (slow: numerics tests only).
  cudnn   GPU cuDNN flash attention through jax.nn.dot_product_attention(implementation='cudnn',
          is_causal=True). Rows of one sample (`lengths` (B,) given: real tokens are a
          prefix of the row, the batch contract with P = 1) pass their lengths as cuDNN's
          sequence lengths and need no mask. Packed rows that follow the batch contract
          (`lengths` (B, P): each sample slot's tokens, contiguous from the row start)
          take cuDNN's packed-segment layout: segment offsets and lengths, each segment
          causal on its own, no mask and no work on other segments' blocks. jax exposes
          that layout only through its private module
          jax._src.cudnn.fused_attention_stablehlo (the signature is the same in jax 0.10
          and 0.11), and cuDNN only from 9.6 on Hopper or later GPUs; elsewhere packed
          rows take the mask. Other packed rows pass the segment mask as the (B, 1, S, S)
          mask, which cuDNN takes as a bias shared by all heads (2 bytes x S^2 per row,
          not the 2 GiB of scores) and which costs time: on an H200 at FUSION 3B width, 2
          x 4096 tokens, the lengths route cut attention from 172 to 90 ms and the train
          step from 0.809 to 0.738 s (docs/performance.md, "Speed on accelerators"). cuDNN runs
          bf16/fp16 only: other dtypes are cast to bfloat16 and the output cast back.
  auto    splash on TPU, cudnn on GPU when the compute dtype is bf16/fp16, else xla.

Segment ids (B, S) int32: tokens attend causally to earlier tokens of the same segment; 0 marks
padding (padding tokens attend among themselves, and no real token sees them). One unpacked
sample per row is `token_mask.astype(int32)`. Every implementation gives the same output at
every row, padding rows included (tests/test_attention_kernels.py), except cuDNN's lengths
route, whose padding rows are only finite, and its packed-segment route, whose padding rows
are zero: no real token reads them and the loss masks them.

Under a mesh (jax.set_mesh + flax logical axis rules) the kernels run in a shard_map over the
'batch' and 'heads' mesh axes of the rules; the sequence is gathered (kernels need whole rows).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fusion_jax.models.attention import dot_product_attention
from fusion_jax.models.llm_config import ATTENTION_IMPLS as IMPLS
from fusion_jax.parallel import remat as remat_lib
from fusion_jax.parallel.sharding import DEFAULT_RULES, mesh_axes_of

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_TARGET: list[str] = []  # target_backend's stack; empty = jax's default backend
_LANES = 128  # splash needs sequence blocks that are multiples of the TPU lane width
_CUDNN_ROWS = 64  # full_attention pads the tower's rows to a multiple of this for cuDNN


@contextlib.contextmanager
def target_backend(name: str) -> Iterator[None]:
  """Trace for `name`'s kernels ('auto', splash interpret mode) instead of jax's default
  backend: fusion_jax.aot compiles TPU programs on a CPU host."""
  _TARGET.append(name)
  try:
    yield
  finally:
    _TARGET.pop()


def _backend() -> str:
  return _TARGET[-1] if _TARGET else jax.default_backend()


def traced_backend() -> str:
  """The backend being traced for: `target_backend`'s while it is active, else jax's default."""
  return _backend()


def resolve_impl(impl: str, dtype, backend: str | None = None) -> str:
  """The implementation `impl` runs as on `backend` (default: jax's) for compute `dtype`."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}; choose one of {IMPLS}")
  backend = backend or _backend()
  if impl == "auto":
    if backend == "tpu":
      return "splash"
    if backend in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in _HALF:
      return "cudnn"
    return "xla"
  return impl


def segment_ids_from(token_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """(B, S) int32 segment ids; 0 wherever token_mask is False. One segment per row when
  `segment_ids` is None."""
  token_mask = token_mask.astype(jnp.bool_)
  if segment_ids is None:
    return token_mask.astype(jnp.int32)
  if segment_ids.shape != token_mask.shape:
    raise ValueError(f"attention: segment_ids {segment_ids.shape} != token_mask "
                     f"{token_mask.shape}; give one id per token (0 = padding)")
  return jnp.where(token_mask, segment_ids.astype(jnp.int32), 0)


class Segments(NamedTuple):
  """The decoder's attention mask without a cache (a pytree the layer scan broadcasts).

  ids: (B, S) int32 segment ids, 0 = padding (`segment_ids_from`).
  lengths: when the rows follow the batch contract (each sample's tokens contiguous from the
    row start, padding after; then cuDNN needs no mask): (B,) int32 real tokens per row of one
    sample, or (B, P) int32 tokens per sample slot of packed rows (`slot_lengths`); None when
    that is not known.
  """
  ids: jax.Array
  lengths: jax.Array | None = None


def slot_lengths(segment_ids: jax.Array, samples_per_row: int) -> jax.Array:
  """(B, S) segment ids -> (B, P) int32 tokens of each sample slot 1..P (0: an empty slot)."""
  slots = jnp.arange(1, samples_per_row + 1, dtype=segment_ids.dtype)
  return jnp.sum(segment_ids[:, :, None] == slots, axis=1).astype(jnp.int32)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """(B, S) segment ids -> (B, 1, S, S) bool: causal and same segment (True = may attend)."""
  s = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((s, s), jnp.bool_))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None, None] & same[:, None]


# ------------------------------------------------------------------------------------ kernels


def _splash_blocks(s: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  # 512 is MaxText's default for long sequences; smaller rows take the largest divisor.
  b = next(x for x in (512, 256, 128) if s % x == 0)
  return sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                       block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _make_splash_kernel(heads: int, seq: int, interpret: bool, causal: bool = True):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = sm.CausalMask((seq, seq)) if causal else sm.FullMask((seq, seq))
  mask = sm.MultiHeadMask([one for _ in range(heads)])
  # The tag lets a remat policy keep the output and logsumexp instead of rerunning the forward.
  return sk.make_splash_mha(mask, block_sizes=_splash_blocks(seq), head_shards=1,
                            q_seq_shards=1, residual_checkpoint_name=remat_lib.ATTN_RESIDUALS,
                            interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     kv_segment_ids: jax.Array | None = None, causal: bool = True,
                     interpret: bool = False) -> jax.Array:
  """Splash attention within segments. q (B, S, H, hd), k/v (B, S, KV, hd) -> (B, S, H, hd).

  segment_ids (B, S): the queries' (and, without kv_segment_ids, the keys') segments; a query
  sees the keys of its segment, the earlier ones only when `causal`. Rows are padded to a
  multiple of 128 with segment 0 (only padding attends to it).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, s, h, hd = q.shape
  kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
  pad = -s % _LANES
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    segment_ids, kv_seg = (jnp.pad(x, ((0, 0), (0, pad))) for x in (segment_ids, kv_seg))
  # Built in every trace, its block tables constants of that trace: a kernel cached across
  # traces carries tracers out of the one that built it (Flax's scan traces its body with
  # partial evaluation, where ensure_compile_time_eval does not apply: a scanned stack's init
  # failed), and concrete tables cannot be placed while an AOT target's mesh is in context.
  kernel = _make_splash_kernel(h, s + pad, interpret, causal)
  # The kernel applies no softmax scale; (H, S, hd) per example.
  qh = (q * jnp.asarray(hd**-0.5, q.dtype)).transpose(0, 2, 1, 3)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def one(q1, k1, v1, seg, kv):
    return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=seg, kv=kv))

  out = jax.vmap(one)(qh, kh, vh, segment_ids.astype(jnp.int32), kv_seg.astype(jnp.int32))
  return out.transpose(0, 2, 1, 3)[:, :s].astype(q.dtype)


def _require_gpu(cudnn_implementation: str) -> None:
  """The cuDNN kernels (not their emulation on jax's XLA path, 'xla') need an NVIDIA GPU."""
  if cudnn_implementation == "cudnn" and _backend() not in ("gpu", "cuda"):
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU (jax backend is "
                     f"{_backend()!r}); use 'auto' or 'xla'")


def _cudnn_dtype(implementation: str, *xs: jax.Array) -> tuple[jax.Array, ...]:
  """xs cast to bfloat16 for cuDNN, which runs bf16/fp16 only (as they are otherwise)."""
  if implementation == "cudnn" and jnp.dtype(xs[0].dtype) not in _HALF:
    return tuple(x.astype(jnp.bfloat16) for x in xs)
  return xs


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    lengths: jax.Array | None = None, *,
                    implementation: str = "cudnn") -> jax.Array:
  """jax.nn.dot_product_attention, causal within segments. Shapes as `splash_attention`.

  lengths: (B,) int32 real tokens of one-sample prefix rows (`Segments`): sequence lengths, no
    mask; (B, P) int32 tokens per sample slot of packed contract rows: the packed-segment
    layout (`_cudnn_packed`); None: the (B, 1, S, S) segment mask.
  implementation='xla' runs the same wrapper through jax's XLA path (CPU tests).
  """
  dt = q.dtype
  q, k, v = _cudnn_dtype(implementation, q, k, v)
  if lengths is not None and lengths.ndim == 2:
    if implementation != "cudnn" or _packed_layout_supported():
      return _cudnn_packed(q, k, v, lengths.astype(jnp.int32), implementation).astype(dt)
    lengths = None  # the mask route
  if lengths is not None:
    lengths = lengths.astype(jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out.astype(dt)
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, S, S)
  out = jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                     implementation=implementation)
  return out.astype(dt)


@functools.cache
def _packed_layout_supported() -> bool:
  """cuDNN's packed-segment layout needs a Hopper or later GPU and cuDNN 9.6 (jax checks
  that only while differentiating, inside the layer scan): checked here, on the host."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    major = int(jax.devices("gpu")[0].compute_capability.split(".")[0])
    return major >= 9 and cudnn_fa.check_cudnn_version() >= 90600
  except Exception:  # no GPU, no cuDNN, or a jax without these helpers: the mask route
    return False


def _cudnn_packed(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                  implementation: str) -> jax.Array:
  """cuDNN's packed-segment layout: slot j of row b holds tokens [start, start + lengths[b, j])
  with start the sum of the slots before it; each slot is causal on its own. q (B, S, H, hd),
  k / v (B, S, KV, hd), lengths (B, P). Padding rows (after the last slot) come back zero.

  cuDNN takes (B, P) lengths and (B, P + 1) start offsets, -1 for slots a row does not use.
  implementation='xla' emulates that layout with the mask it stands for (CPU tests).
  """
  b, s = q.shape[:2]
  ends = jnp.cumsum(lengths, axis=1)  # (B, P)
  t = jnp.arange(s)
  real = t[None, :] < ends[:, -1:]  # (B, S)
  if implementation == "cudnn":
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
    used = lengths > 0
    seqlen = jnp.where(used, lengths, -1)
    offsets = jnp.concatenate([jnp.where(used, ends - lengths, -1),
                               jnp.full((b, 1), -1, jnp.int32)], axis=1)
    out = cudnn_fa.dot_product_attention(
        q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5, mask_type=cudnn_fa.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH")
  else:
    slot = jnp.sum(t[None, None, :] >= ends[:, :, None], axis=1)  # (B, S): P after the last
    same = (slot[:, :, None] == slot[:, None, :]) & real[:, :, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True,
                                       implementation="xla")
  return jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype))


def _mesh_axes(names: tuple[str, ...]) -> tuple:
  rules = nn.get_logical_axis_rules() or DEFAULT_RULES
  return tuple(nn.logical_to_mesh_axes(names, list(rules)))


def _axis_size(mesh, axes) -> int:
  n = 1
  for a in mesh_axes_of(axes):
    n *= mesh.shape[a]
  return n


def _sharded(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
             *per_row: jax.Array) -> jax.Array:
  """fn(q, k, v, *per_row) per shard of a shard_map over the batch and heads mesh axes (no
  mesh: fn directly); `per_row` arrays (segment ids, lengths) are split by batch only."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, *per_row)
  batch_ax, _, heads_ax, _ = _mesh_axes(("batch", "length", "heads", "head_dim"))
  h, kv = q.shape[2], k.shape[2]
  if q.shape[0] % _axis_size(mesh, batch_ax):
    batch_ax = None
  shards = _axis_size(mesh, heads_ax)
  if h % shards:
    heads_ax = None
  elif kv % shards:
    # Whole kv groups per shard need KV divisible too; else give every q head its own kv head.
    k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
  qs = P(batch_ax, None, heads_ax, None)
  in_specs = (qs, qs, qs) + tuple(P(batch_ax, *(None,) * (x.ndim - 1)) for x in per_row)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=qs,
                       check_vma=False)(q, k, v, *per_row)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     lengths: jax.Array | None = None, impl: str = "auto",
                     cudnn_implementation: str = "cudnn") -> jax.Array:
  """Causal self attention within segments (module docstring).

  Args:
    q: (B, S, H, hd) queries (rotary applied).
    k: (B, S, KV, hd) keys; H a multiple of KV.
    v: (B, S, KV, hd) values.
    segment_ids: (B, S) int32, 0 = padding.
    lengths: (B,) int32 or None, as `Segments.lengths` (only cuDNN uses it).
    impl: one of IMPLS.
    cudnn_implementation: 'xla' runs the cudnn wrapper on jax's XLA path (CPU tests).

  Returns:
    (B, S, H, hd) in q's dtype.
  """
  impl = resolve_impl(impl, q.dtype)
  if impl == "xla":
    return dot_product_attention(q, k, v, segment_mask(segment_ids))
  if impl == "splash":
    fn = functools.partial(splash_attention, interpret=_backend() != "tpu")
  else:
    _require_gpu(cudnn_implementation)
    fn = functools.partial(cudnn_attention, implementation=cudnn_implementation)
    return _sharded(fn, q, k, v, segment_ids, *(() if lengths is None else (lengths,)))
  return _sharded(fn, q, k, v, segment_ids)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                   key_lengths: jax.Array | None = None, impl: str = "auto",
                   cudnn_implementation: str = "cudnn") -> jax.Array:
  """Bidirectional attention over every key, or over each row's first `key_lengths` keys (the
  vision tower: tiles and plain images; the text-guided image's padded text keys).

  q, k, v: (B, M, H, hd). key_lengths: (B,) int32 or None. impl: VisionConfig.attention_impl;
  'cudnn' (what 'auto' resolves to on a GPU in bf16/fp16) runs jax.nn.dot_product_attention's
  cuDNN kernel when hd is a multiple of 8 up to 128 (SigLIP: 72); 'splash' (what 'auto'
  resolves to on TPU) the splash kernel with a full mask, the queries in segment 1 and the
  valid keys in segment 1 (Pallas interpret mode off TPU); anything else the XLA path
  (float32 scores (B, H, M, M)). Returns (B, M, H, hd) in q's dtype.
  """
  m = q.shape[1]
  resolved = resolve_impl(impl, q.dtype)
  if resolved == "splash":
    def splash(q, k, v, *lengths):
      keys = (jnp.arange(m)[None] < lengths[0][:, None]).astype(jnp.int32) if lengths else None
      return splash_attention(q, k, v, jnp.ones(q.shape[:2], jnp.int32), causal=False,
                              kv_segment_ids=keys, interpret=_backend() != "tpu")

    return _sharded(splash, q, k, v, *(() if key_lengths is None else (key_lengths,)))
  # cuDNN's flash kernels take head widths that are multiples of 8 up to 128 on every GPU
  # generation (jax checks it while differentiating, deep inside the tower's scan): others
  # stay on the XLA path.
  hd = q.shape[-1]
  if resolved != "cudnn" or hd % 8 or hd > 128:
    mask = None if key_lengths is None else (
        jnp.arange(m)[None, None, None, :] < key_lengths[:, None, None, None])
    return dot_product_attention(q, k, v, mask)
  _require_gpu(cudnn_implementation)

  def fn(q, k, v, *lengths):
    dt, b = q.dtype, q.shape[0]
    q, k, v = _cudnn_dtype(cudnn_implementation, q, k, v)
    # cuDNN's training kernels refuse some lengths (jax 0.11 on an H200: 729, SigLIP's 27 x 27
    # patches): pad the rows to a multiple of 64; the padded keys are cut off by the key
    # lengths and the padded query rows dropped.
    pad = -m % _CUDNN_ROWS
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    kv_len = lengths[0].astype(jnp.int32) if lengths else (
        jnp.full((b,), m, jnp.int32) if pad else None)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len,
                                       implementation=cudnn_implementation)
    return out[:, :m].astype(dt)

  return _sharded(fn, q, k, v, *(() if key_lengths is None else (key_lengths,)))


def valid_keys_first(key_valid: jax.Array) -> jax.Array:
  """() bool: in every row of key_valid (B, M) the valid keys form a prefix."""
  lengths = jnp.sum(key_valid, axis=-1, dtype=jnp.int32)
  return jnp.all(key_valid == (jnp.arange(key_valid.shape[1])[None] < lengths[:, None]))


def key_padding_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *,
                          uniform_rows: jax.Array | None = None, impl: str = "auto",
                          cudnn_implementation: str = "cudnn") -> jax.Array:
  """The text-guided image's attention rule (fusion_jax.models.text_guided, faithful mode):
  every query sees the valid keys; `uniform_rows` ignore scores and mask and attend uniformly
  to all M keys. Same result as attention.dot_product_attention(q, k, v, key_valid[:, None,
  None, :], uniform_rows=uniform_rows).

  key_valid: (B, M) bool. On the cuDNN and splash routes the valid keys must come first in each
  row (image patches, then the instruction's tokens, then padding): they become key lengths. A
  row where they do not takes the XLA path instead (a lax.cond on the device, decided per
  batch; on an H200 it cost no measurable time).
  """
  mask = key_valid[:, None, None, :]
  if resolve_impl(impl, q.dtype) not in ("cudnn", "splash"):
    return dot_product_attention(q, k, v, mask, uniform_rows=uniform_rows)
  lengths = jnp.sum(key_valid, axis=-1, dtype=jnp.int32)
  out = jax.lax.cond(
      valid_keys_first(key_valid),
      lambda: full_attention(q, k, v, key_lengths=lengths, impl=impl,
                             cudnn_implementation=cudnn_implementation),
      lambda: dot_product_attention(q, k, v, mask))
  if uniform_rows is None:
    return out
  g = q.shape[2] // k.shape[2]
  mean_v = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), g, axis=1)  # (B, H, hd)
  return jnp.where(uniform_rows[:, :, None, None], mean_v[:, None].astype(out.dtype), out)
