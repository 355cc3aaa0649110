"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training", Algorithm 1).

  logits_ij = t * <x_i, y_j> + b,   t = exp(t'),  z_ij = +1 if i == j else -1
  loss = -(1 / n) * sum_i sum_j log sigmoid(z_ij * logits_ij)

x, y: L2-normalised image and text embeddings of the n pairs of a batch. The paper
initialises t' = log 10 and b = -10 (few positives among n^2 pairs).

`candidate_sigmoid_loss` is the same per-pair term on explicit hard negatives: each image against
its own question's candidate answers, one matching (as NegCLIP's hard negatives, the texts
differ in the asked-for word only); few negatives per positive, so its own t and b start at
log 10 and 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INIT_LOG_T = math.log(10.0)
INIT_BIAS = -10.0


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """(..., D) -> unit rows."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def sigmoid_loss(img: jax.Array, txt: jax.Array, log_t: jax.Array, bias: jax.Array) -> jax.Array:
  """img, txt: (n, D) L2-normalised; log_t, bias: scalars -> scalar loss (paper's 1/n)."""
  logits = jnp.exp(log_t) * img @ txt.T + bias
  z = 2.0 * jnp.eye(img.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / img.shape[0]


def candidate_sigmoid_loss(img: jax.Array, cand: jax.Array, answer: jax.Array, valid: jax.Array,
                           log_t: jax.Array, bias: jax.Array, weight: jax.Array) -> jax.Array:
  """img (n, D), cand (n, K, D) L2-normalised; answer (n,) the matching candidate; valid (n, K);
  weight (n,) -> scalar: the pairwise sigmoid term over each image's own candidate texts,

  mean_i w_i * -sum_k valid_ik log sigmoid(z_ik (t <x_i, c_ik> + b)),  z_ik = +1 iff k = answer_i.
  """
  logits = jnp.exp(log_t) * jnp.einsum("nd,nkd->nk", img, cand) + bias
  z = jnp.where(jnp.arange(cand.shape[1])[None] == answer[:, None], 1.0, -1.0)
  per = -jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(z * logits), 0.0), axis=1)
  w = weight.astype(per.dtype)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
