"""SigLIP vision transformer (docs/model.md §2-3), the FUSION vision tower.

Pre-LN ViT: conv patch embedding with bias + learned position table, then L encoder layers
(LayerNorm eps 1e-6 -> MHA with biases -> residual; LayerNorm -> fc1 -> gelu(tanh) -> fc2 ->
residual). FUSION drops the last layer and the pooling head (`fusion_tower`) and never applies
`post_layernorm`; it reads every hidden state, so `encode` returns all of them.

Parameter tree (mirrors transformers' SiglipVisionModel; see fusion_jax/convert/hf_siglip.py):
  embeddings/patch_embedding/{kernel (p, p, 3, Dv), bias (Dv,)}
  embeddings/position_embedding (N, Dv)
  layers_{i}/layer_norm1/{scale, bias}
  layers_{i}/self_attn/{q_proj, k_proj, v_proj}/{kernel (Dv, heads, hd), bias (heads, hd)}
  layers_{i}/self_attn/out_proj/{kernel (heads, hd, Dv), bias (Dv,)}
  layers_{i}/layer_norm2/{scale, bias}
  layers_{i}/mlp/{fc1/{kernel (Dv, F), bias (F,)}, fc2/{kernel (F, Dv), bias (Dv,)}}
  post_layernorm/{scale, bias}
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fusion_jax import config_util
from fusion_jax.parallel import remat as remat_lib
from fusion_jax.models import attention_kernels
from fusion_jax.models.attention import dot_product_attention
from fusion_jax.models.connector import connector_k, feature_connector
from fusion_jax.models.layers import DenseGeneral
from fusion_jax.parallel.remat import policy_from_name, remat
from fusion_jax.parallel.sharding import constrain


VISION_ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shape and numerics of a SigLIP tower. `num_layers` = encoder layers present and run."""
  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False        # one nn.scan over the layers (stacked `layers` params)
  # Attention kernel: auto | xla | cudnn | splash (attention_kernels.full_attention and
  # key_padding_attention; auto = cudnn on a GPU in bf16, splash on TPU) for the unmasked
  # attention (tiles, plain images) and the text-guided image's key padding (+ uniform rows); a
  # query-dependent mask (block_vision_to_text's early layers) takes the XLA path.
  attention_impl: str = "auto"

  def __post_init__(self):
    # image_size need not be a multiple of patch_size: the VALID conv drops the remainder
    # (SigLIP so400m: 384 // 14 = 27 patches per side, the last 6 pixels unused).
    if self.patch_size > self.image_size:
      raise ValueError(f"VisionConfig: patch_size {self.patch_size} > image_size {self.image_size}")
    if self.attention_impl not in VISION_ATTENTION_IMPLS:
      raise ValueError(f"VisionConfig.attention_impl={self.attention_impl!r}; choose one of "
                       f"{VISION_ATTENTION_IMPLS}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"VisionConfig: hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")
    if self.num_layers < 1:
      raise ValueError(f"VisionConfig: num_layers must be >= 1, got {self.num_layers}")
    policy_from_name(self.remat_policy)  # fail at config time on an unknown name

  @property
  def grid_size(self) -> int:
    """Patches per side (27 for SigLIP so400m/14@384, 24 for SigLIP2 giant/16@384)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """N, the tokens per image."""
    return self.grid_size**2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> VisionConfig:
    return config_util.from_dict(cls, d, "VisionConfig.from_dict")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Full pretrained towers as published (the layer count is the checkpoint's); FUSION runs
# `fusion_tower(...)` of these.
SIGLIP_SO400M_14_384 = VisionConfig(
    image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=27,
    num_heads=16)
SIGLIP2_GIANT_OPT_16_384 = VisionConfig(
    image_size=384, patch_size=16, hidden_size=1536, intermediate_size=6144, num_layers=40,
    num_heads=16)


def fusion_tower(cfg: VisionConfig) -> VisionConfig:
  """The tower FUSION runs: the last encoder layer dropped (L' = L - 1, docs/model.md §3)."""
  return dataclasses.replace(cfg, num_layers=cfg.num_layers - 1)


# Attention rule of one layer: (mask broadcastable to (B, 1, M, M) bool | None,
# uniform_rows (B, M) bool | None); True in mask = may attend.
LayerMask = tuple[jax.Array | None, jax.Array | None]


class LayerMasks(NamedTuple):
  """Per-layer attention rules: `early` for layers i < k, `late` for the rest.

  Callable with a Python layer index (the unrolled loop); `select(i)` takes a traced index
  (the scanned loop).
  """
  early: LayerMask
  late: LayerMask
  k: int

  def __call__(self, i: int) -> LayerMask:
    return self.early if i < self.k else self.late

  def select(self, i: jax.Array) -> LayerMask:
    is_early = i < self.k
    (em, eu), (lm, lu) = self.early, self.late
    # None = no rule: every key allowed (mask True), no uniform row (uniform False).
    return _where_rule(is_early, em, lm, True), _where_rule(is_early, eu, lu, False)


def _where_rule(cond: jax.Array, a: jax.Array | None, b: jax.Array | None, absent: bool
                ) -> jax.Array | None:
  """jnp.where(cond, a, b) of two optional rules; None when both are absent."""
  if a is None and b is None:
    return None
  fill = jnp.bool_(absent)
  return jnp.where(cond, fill if a is None else a, fill if b is None else b)


PLAIN = LayerMasks((None, None), (None, None), 0)  # full bidirectional attention everywhere


def _partitioned(init, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


def _layer_norm(cfg: VisionConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance like torch (the fast E[x^2]-E[x]^2 form drifts by ~1e-6).
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      use_fast_variance=False,
      scale_init=_partitioned(nn.initializers.ones, ("norm",)),
      bias_init=_partitioned(nn.initializers.zeros, ("norm",)), name=name)


_kernel_init = nn.initializers.lecun_normal()


class VisionEmbeddings(nn.Module):
  """Conv patch embedding (stride = kernel = p, with bias) + learned position table."""
  config: VisionConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """pixels: (B, H, W, 3) normalised floats -> hs[0]: (B, N, Dv)."""
    cfg = self.config
    b, h, w, c = pixels.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"VisionEmbeddings: pixels {pixels.shape} do not match the tower's "
                       f"(B, {cfg.image_size}, {cfg.image_size}, 3); resize/crop the images first")
    p = cfg.patch_size
    # flax forbids a repeated logical name, so only one of the (p, p, 3) input dims carries
    # 'patch'; every rule maps it to None (the patch kernel is tiny).
    x = nn.Conv(
        cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_partitioned(_kernel_init, ("patch", None, None, "embed")),
        bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
        name="patch_embedding")(pixels.astype(cfg.dtype))
    # Row-major over the (H/p, W/p) grid, like torch's flatten(2) of (B, Dv, h, w).
    x = x.reshape(b, cfg.num_patches, cfg.hidden_size)
    pos = self.param(
        "position_embedding",
        _partitioned(nn.initializers.normal(cfg.hidden_size**-0.5), ("pos", "embed")),
        (cfg.num_patches, cfg.hidden_size), cfg.param_dtype)
    x = x + pos.astype(cfg.dtype)[None]
    return constrain(x, ("batch", "length", "embed"))


class VisionAttention(nn.Module):
  """Multi-head self attention with biased q/k/v/out projections (torch `self_attn`)."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, uniform_rows: jax.Array | None) -> jax.Array:
    """x: (B, M, Dv) -> (B, M, Dv)."""
    cfg = self.config
    h, hd = cfg.num_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def in_proj(name):
      return DenseGeneral(
          (h, hd), kernel_axes=("embed", "heads", "head_dim"), use_bias=True,
          bias_axes=("heads", "head_dim"), kernel_init=_kernel_init, name=name, **kw)(x)

    names = ("batch", "length", "heads", "head_dim")
    # Tags let the name-based remat policies (fusion_jax.parallel.remat) save these.
    q = checkpoint_name(constrain(in_proj("q_proj"), names), remat_lib.QUERY_PROJ)
    k = checkpoint_name(constrain(in_proj("k_proj"), names), remat_lib.KEY_PROJ)
    v = checkpoint_name(constrain(in_proj("v_proj"), names), remat_lib.VALUE_PROJ)
    if mask is None and uniform_rows is None:
      out = attention_kernels.full_attention(q, k, v, impl=cfg.attention_impl)
    elif mask is not None and mask.ndim == 4 and mask.shape[1:3] == (1, 1):
      # Key padding (+ uniform rows): the text-guided image's late layers, and its early ones
      # in the faithful mode.
      out = attention_kernels.key_padding_attention(
          q, k, v, jnp.broadcast_to(mask[:, 0, 0, :], (q.shape[0], k.shape[1])),
          uniform_rows=uniform_rows, impl=cfg.attention_impl)
    else:
      out = dot_product_attention(q, k, v, mask, uniform_rows=uniform_rows)
    out = checkpoint_name(out, remat_lib.ATTN_OUT)
    out = DenseGeneral(
        cfg.hidden_size, kernel_axes=("heads", "head_dim", "embed"), axis=(-2, -1),
        use_bias=True, bias_axes=("embed",), kernel_init=_kernel_init, name="out_proj",
        **kw)(out)
    return out


class VisionMLP(nn.Module):
  """fc1 -> gelu (tanh approximation, torch 'gelu_pytorch_tanh') -> fc2, with biases."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    y = nn.Dense(cfg.intermediate_size, name="fc1",
                 kernel_init=_partitioned(_kernel_init, ("embed", "mlp")),
                 bias_init=_partitioned(nn.initializers.zeros, ("mlp",)), **kw)(x)
    y = constrain(nn.gelu(y, approximate=True), ("batch", "length", "mlp"))
    y = checkpoint_name(y, remat_lib.MLP_HIDDEN)
    return nn.Dense(cfg.hidden_size, name="fc2",
                    kernel_init=_partitioned(_kernel_init, ("mlp", "embed")),
                    bias_init=_partitioned(nn.initializers.zeros, ("embed",)), **kw)(y)


class VisionEncoderLayer(nn.Module):
  """One pre-LN SigLIP encoder layer."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               uniform_rows: jax.Array | None = None) -> jax.Array:
    """x: (B, M, Dv); mask broadcastable to (B, 1, M, M); uniform_rows (B, M). -> (B, M, Dv)."""
    return self._block(x, mask, uniform_rows)

  def _block(self, x: jax.Array, mask: jax.Array | None,
             uniform_rows: jax.Array | None) -> jax.Array:
    cfg = self.config
    y = _layer_norm(cfg, "layer_norm1")(x)
    x = x + VisionAttention(cfg, name="self_attn")(y, mask, uniform_rows)
    y = _layer_norm(cfg, "layer_norm2")(x)
    x = x + VisionMLP(cfg, name="mlp")(y)
    return constrain(x, ("batch", "length", "embed"))


class VisionScanLayer(VisionEncoderLayer):
  """The encoder layer as an nn.scan body that keeps only what the feature connector reads.

  Carry (x, sum_a, sum_b, i): the current state hs[i], float32 running sums of hs[0..k-1] and
  hs[k..2k-1] (k = floor(L'/2), docs/model.md §3), and the layer index. The sums add the states in
  the order the unrolled connector does, so the features are bitwise the same.
  """

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, ...], masks: LayerMasks, _: None = None):
    x, sum_a, sum_b, i = carry
    mask, uniform_rows = masks.select(i)
    x = self._block(x, mask, uniform_rows)
    k = self.config.num_layers // 2
    j = i + 1  # x is hs[j]
    xf = x.astype(jnp.float32)
    sum_a = jnp.where(j < k, sum_a + xf, sum_a)
    sum_b = jnp.where((j >= k) & (j < 2 * k), sum_b + xf, sum_b)
    return (x, sum_a, sum_b, j), None


class VisionTower(nn.Module):
  """SigLIP ViT returning every hidden state. Methods: embed, encode, post_norm, __call__."""
  config: VisionConfig

  def setup(self):
    cfg = self.config
    self.embeddings = VisionEmbeddings(cfg)
    if cfg.scan_layers:
      body = remat(VisionScanLayer, cfg.remat_policy, prevent_cse=False)
      self.layers = nn.scan(
          body, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast,), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      layer_cls = remat(VisionEncoderLayer, cfg.remat_policy)  # names: fusion_jax.parallel.remat
      # A list attribute names its modules layers_0 .. layers_{L-1}, like HF's encoder.layers.{i}.
      self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
    self.post_layernorm = _layer_norm(cfg, "post_layernorm")

  def embed(self, pixels: jax.Array) -> jax.Array:
    """pixels: (B, H, W, 3) normalised -> hs[0] = patch + position embeddings, (B, N, Dv)."""
    return self.embeddings(pixels)

  def encode(self, x: jax.Array, layer_masks: LayerMasks | None = None) -> list[jax.Array]:
    """Runs the encoder over M tokens.

    Args:
      x: (B, M, Dv) input tokens (hs[0]).
      layer_masks: None (full bidirectional attention everywhere) or `i -> (mask, uniform_rows)`
        giving layer i's attention rule (0-based), so early and late layers may differ.

    Returns:
      [hs0 = x, hs1, ..., hsL], each (B, M, Dv).
    """
    if self.config.scan_layers:
      raise ValueError("VisionTower.encode returns every hidden state, which a scanned tower "
                       "does not keep; use VisionTower.features (or scan_layers=False)")
    x = constrain(x.astype(self.config.dtype), ("batch", "length", "embed"))
    hidden_states = [x]
    for i, layer in enumerate(self.layers):
      mask, uniform_rows = (None, None) if layer_masks is None else layer_masks(i)
      x = layer(x, mask, uniform_rows)
      hidden_states.append(x)
    if self.is_initializing():
      # Create post_layernorm's params (every checkpoint has them) on whichever path a parent
      # initialises through, without using them.
      self.post_norm(x)
    return hidden_states

  def features(self, x: jax.Array, layer_masks: LayerMasks | None = None) -> jax.Array:
    """The feature connector's input, computed without keeping every hidden state when scanned.

    x: (B, M, Dv) hs[0] -> (B, M, 3Dv) = concat[hs[L'], mean(hs[0..k-1]), mean(hs[k..2k-1])]
    (fusion_jax.models.connector.feature_connector of `encode`, bitwise).
    """
    cfg = self.config
    if not cfg.scan_layers:
      return feature_connector(self.encode(x, layer_masks))
    k = connector_k(cfg.num_layers)
    if k < 1:
      raise ValueError(f"VisionTower.features: the connector needs >= 2 layers, got {cfg.num_layers}")
    x = constrain(x.astype(cfg.dtype), ("batch", "length", "embed"))
    xf = x.astype(jnp.float32)
    carry = (x, xf, jnp.zeros_like(xf), jnp.int32(0))  # hs[0] opens the first group
    (x, sum_a, sum_b, _), _ = self.layers(carry, PLAIN if layer_masks is None else layer_masks)
    if self.is_initializing():
      self.post_norm(x)
    out = jnp.concatenate([x, (sum_a / k).astype(x.dtype), (sum_b / k).astype(x.dtype)], axis=-1)
    return constrain(out, ("batch", "length", "embed"))

  def post_norm(self, x: jax.Array) -> jax.Array:
    """post_layernorm (HF's last_hidden_state); FUSION never applies it."""
    return self.post_layernorm(x)

  def __call__(self, pixels: jax.Array) -> list[jax.Array]:
    """Plain tower: pixels (B, H, W, 3) -> [hs0, ..., hsL], each (B, N, Dv)."""
    return self.encode(self.embed(pixels))
