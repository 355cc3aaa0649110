"""Rematerialisation (gradient checkpointing) policies by name, shared by the LLM and the ViT.

Config files name a policy; `remat(BlockCls, name)` returns the block class wrapped in
`nn.remat` with the matching `jax.checkpoint_policies` entry (or the class unchanged for
'none'). Names (MaxText vocabulary where it has one):

  none                     no remat: every activation is kept (fastest, most memory)
  full                     save nothing inside the block; recompute it all in the backward pass
  dots                     save every matmul output
  dots_with_no_batch_dims  save matmul outputs whose dot has no batch dimension (weight matmuls,
                           not attention score/value einsums)
  dots_with_no_batch_dims_and_attention
                           the above plus the fused attention kernel's residuals (its output
                           and softmax statistics: cuDNN's, or splash's under the
                           ATTN_RESIDUALS tag), so the backward pass does not run the
                           attention forward again (MaxText's minimal_with_context); on the
                           XLA path it equals dots_with_no_batch_dims
  save_qkv_proj            save the q/k/v projections only (tagged with checkpoint_name)
  save_attn_out            save q/k/v projections and the attention output (before o_proj)
  save_qkv_attn_mlp        save the above and the MLP hidden activation (before down_proj)

Blocks tag activations with `jax.ad_checkpoint.checkpoint_name` under the names in
`CHECKPOINT_NAMES` so the name-based policies work for any block that uses the same tags.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

# Activation tags blocks may set with jax.ad_checkpoint.checkpoint_name(x, tag).
QUERY_PROJ = "query_proj"
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
ATTN_OUT = "attention_out"
MLP_HIDDEN = "mlp_hidden"
CHECKPOINT_NAMES = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, ATTN_OUT, MLP_HIDDEN)
# The splash kernel's own tag for its residuals (make_splash_mha's residual_checkpoint_name).
ATTN_RESIDUALS = "attention_residuals"

_cp = jax.checkpoint_policies

# jax primitives whose outputs are a fused attention's residuals (jax.nn.dot_product_attention's
# cuDNN forward, outside and inside its custom_vjp); splash tags its own (ATTN_RESIDUALS).
FUSED_ATTENTION_PRIMITIVES = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")
_splash_residuals_saveable = _cp.save_only_these_names(ATTN_RESIDUALS)


def _fused_attention_saveable(prim, *args, **params) -> bool:
  return (prim.name in FUSED_ATTENTION_PRIMITIVES
          or _splash_residuals_saveable(prim, *args, **params))


_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots": _cp.dots_saveable,
    "dots_with_no_batch_dims": _cp.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims_and_attention": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _fused_attention_saveable),
    "save_qkv_proj": _cp.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ),
    "save_attn_out": _cp.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ, ATTN_OUT),
    "save_qkv_attn_mlp": _cp.save_only_these_names(*CHECKPOINT_NAMES),
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def policy_from_name(name: str) -> Callable[..., bool] | None:
  """jax.checkpoint policy for `name`; None for 'none'. ValueError lists the valid names."""
  if name not in _POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; valid names: {', '.join(POLICY_NAMES)}")
  return _POLICIES[name]


def remat(module_cls: type[nn.Module], policy: str, *, static_argnums: tuple[int, ...] = (),
          prevent_cse: bool = True) -> type[nn.Module]:
  """`module_cls` wrapped in nn.remat with the named policy ('none' returns it unchanged).

  static_argnums counts `self` as 0 (Linen convention), e.g. (2,) for a bool second argument.
  prevent_cse may be False when the block runs inside nn.scan (scan already prevents CSE).
  """
  if policy_from_name(policy) is None:  # 'none'
    return module_cls
  return nn.remat(module_cls, policy=policy_from_name(policy), static_argnums=static_argnums,
                  prevent_cse=prevent_cse)
