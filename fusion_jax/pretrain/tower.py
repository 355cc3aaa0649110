"""A tiny SigLIP tower pretrained with the sigmoid loss on synthesized image-caption pairs.

Image side: the SigLIP ViT (fusion_jax.models.vision.VisionTower, all layers), post_layernorm,
mean over patches, a linear map to the joint space (SigLIP uses an attention-pooling head; the
head is not shipped: FUSION reads hidden states, never the pooled embedding). Text side: a
bag-of-tokens encoder (token embeddings averaged over the caption, a 2-layer MLP): on 2 shared
CPU cores a text transformer over ~100-token captions costs more than the tower itself. Only
the tower is written out.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusion_jax.convert.hf_siglip import siglip_tensors_to_torch
from fusion_jax.convert.safetensors_io import write_safetensors
from fusion_jax.models.vision import VisionConfig, VisionTower
from fusion_jax.pretrain.siglip import INIT_BIAS, INIT_LOG_T, l2_normalize, sigmoid_loss


class BagOfTokens(nn.Module):
  """(B, T) ids + mask -> (B, width): mean token embedding through a 2-layer MLP."""
  vocab_size: int
  width: int = 128

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    e = nn.Embed(self.vocab_size, self.width)(ids)
    m = mask[..., None].astype(e.dtype)
    h = jnp.sum(e * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return nn.Dense(self.width)(nn.gelu(nn.Dense(self.width)(h)))


class DualEncoder(nn.Module):
  """Tower + bag-of-tokens text encoder -> L2-normalised (B, E) embeddings, log_t and bias."""
  vision: VisionConfig
  vocab_size: int
  embed_dim: int = 64

  def setup(self):
    self.tower = VisionTower(self.vision)
    self.text_encoder = BagOfTokens(self.vocab_size)
    self.img_proj = nn.Dense(self.embed_dim)
    self.txt_proj = nn.Dense(self.embed_dim)
    self.log_t = self.param("log_t", lambda _: jnp.asarray(INIT_LOG_T, jnp.float32))
    self.bias = self.param("bias", lambda _: jnp.asarray(INIT_BIAS, jnp.float32))

  def __call__(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array):
    """pixels (B, H, W, 3) normalised, ids / mask (B, T) -> (img (B, E), txt (B, E), log_t, b)."""
    hs = self.tower(pixels)
    img = self.img_proj(jnp.mean(self.tower.post_norm(hs[-1]), axis=1))
    txt = self.txt_proj(self.text_encoder(ids, mask))
    return l2_normalize(img), l2_normalize(txt), self.log_t, self.bias


def normalize(images: np.ndarray) -> jax.Array:
  """uint8 (B, H, W, 3) -> (x / 255 - 0.5) / 0.5 as FUSION feeds its tower."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5


def train_tower(vision: VisionConfig, images: np.ndarray, captions: np.ndarray,
                caption_mask: np.ndarray, vocab_size: int, *, steps: int, batch: int = 256,
                lr: float = 1e-3, seed: int = 0, log: Callable[[str], None] = print
                ) -> tuple[dict[str, Any], list[float]]:
  """Trains the dual encoder; returns (its params, loss per step); ["tower"] ships.

  images (N, H, W, 3) uint8; captions / caption_mask (N, T) token ids / validity.
  """
  model = DualEncoder(vision, vocab_size)
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), normalize(images[:2]), captions[:2],
                      caption_mask[:2])["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
  opt = optax.adamw(sched, weight_decay=1e-4)
  state = opt.init(params)

  @jax.jit
  def step(params, state, pix, ids, mask):
    def loss_fn(p):
      img, txt, log_t, b = model.apply({"params": p}, pix, ids, mask)
      return sigmoid_loss(img, txt, log_t, b)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  n = images.shape[0]
  losses: list[float] = []
  t0 = time.time()
  order = rng.permutation(n)
  pos = 0
  for i in range(steps):
    if pos + batch > n:
      order, pos = rng.permutation(n), 0
    idx = np.sort(order[pos:pos + batch])
    pos += batch
    params, state, loss = step(params, state, normalize(images[idx]), captions[idx],
                               caption_mask[idx])
    losses.append(float(loss))
    if (i + 1) % max(1, steps // 10) == 0 or i == 0:
      log(f"tower step {i + 1}/{steps}: sigmoid loss {losses[-1]:.4f} "
          f"(t {float(np.exp(params['log_t'])):.1f}, b {float(params['bias']):.2f}, "
          f"{time.time() - t0:.0f} s)")
  return jax.tree.map(np.asarray, params), losses


def retrieval_accuracy(vision: VisionConfig, params: dict[str, Any], images: np.ndarray,
                       captions: np.ndarray, caption_mask: np.ndarray, vocab_size: int) -> float:
  """Image -> caption top-1 accuracy inside the given set (a sanity number for the log)."""
  model = DualEncoder(vision, vocab_size)
  img, txt, _, _ = model.apply({"params": params}, normalize(images), captions, caption_mask)
  return float(np.mean(np.argmax(np.asarray(img @ txt.T), axis=1) == np.arange(len(images))))


def hf_vision_config(vision: VisionConfig) -> dict[str, Any]:
  """transformers SiglipVisionModel config.json (no pooling head)."""
  return {
      "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
      "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
      "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads,
      "num_channels": 3, "image_size": vision.image_size, "patch_size": vision.patch_size,
      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vision.layer_norm_eps,
      "attention_dropout": 0.0, "vision_use_head": False, "dtype": "float32"}


def save_siglip(out_dir: str, vision: VisionConfig, tower_params: dict[str, Any]) -> None:
  """SiglipVisionModel directory: config.json + model.safetensors (keys without prefix)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_vision_config(vision), f, indent=2, sort_keys=True)
  write_safetensors(out_dir, dict(siglip_tensors_to_torch(tower_params, "")))
