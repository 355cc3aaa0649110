"""A tiny SigLIP tower pretrained with the sigmoid loss on synthesized image-caption pairs.

Image side: the SigLIP ViT (fusion_jax.models.vision.VisionTower, all layers), post_layernorm
and SigLIP's attention-pooling (MAP) head, a linear map to the joint space. Text side: a
2-layer transformer (its last token). Only the tower is written out: FUSION reads hidden
states, never the pooled embedding.

Two sigmoid terms (siglip.py):
  captions   the scene's caption against the batch's (SigLIP's loss, n x n pairs);
  QA facts   the scene pooled by the MAP head with one of its closed questions as the query,
             against that question's candidate answers (the right one +1, the others -1: hard
             negatives one word apart). Captions alone are solved by colours (every scene has
             its own colour set), so a tower trained on them learned little else; the facts
             ask exactly what the main job's questions ask (count, relation, background,
             shape). The question-as-query pooling is how FUSION reads the tower too: its LLM
             attends to the patch tokens from the question's positions.
And one dense term (`dense_loss`, weight `dense_weight`): from each patch token of the layer
FUSION reads (the last one it keeps), a linear head names the shape and colour of the object
covering that patch (or none) and the background pattern. The synthesizer knows what it drew
where (synth.render.object_labels), as detection and segmentation data know it for real
images. The sigmoid terms pool over the patches and let a scene-level summary answer; FUSION's
LLM reads the patch tokens one by one, so the colour -> shape binding and the texture have to
be in each token: without this term the tower named the shape of the asked object less often
than chance (a present but wrong object's, 0.09 with 5 candidates) and the background pattern
was more readable from a random tower's tokens than from the pretrained one's.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusion_jax.convert.hf_siglip import siglip_tensors_to_torch
from fusion_jax.convert.safetensors_io import write_safetensors
from fusion_jax.models.vision import VisionConfig, VisionTower
from fusion_jax.pretrain.lm import pad_rows
from fusion_jax.pretrain.pairs import Item
from fusion_jax.pretrain.siglip import (INIT_BIAS, INIT_LOG_T, candidate_sigmoid_loss,
                                        l2_normalize, sigmoid_loss)
from fusion_jax.synth.scene import COLORS, PATTERNS, SHAPES

# Dense targets per patch: (shape, colour, pattern) class counts; class 0 of shape and colour
# is "no object covers this patch" (less than MIN_COVER of its pixels).
DENSE_CLASSES = (1 + len(SHAPES), 1 + len(COLORS), len(PATTERNS))
MIN_COVER = 1 / 8


class TextEncoder(nn.Module):
  """(B, T) ids + mask -> (B, width): pre-LN transformer, the last valid token's state.

  The last token, as CLIP's end-of-text token, not the mean: a fact and its hard negative
  differ in one word, which a mean over the text dilutes.
  """
  vocab_size: int
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = 512

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.width))
    x = nn.Embed(self.vocab_size, self.width)(ids) + pos[:ids.shape[1]]
    attn_mask = nn.make_attention_mask(mask, mask)
    for _ in range(self.num_layers):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(self.num_heads)(h, h, mask=attn_mask)
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
    x = nn.LayerNorm()(x)
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class DualEncoder(nn.Module):
  """Tower + MAP head and a text transformer -> L2-normalised (B, E) embeddings."""
  vision: VisionConfig
  vocab_size: int
  embed_dim: int = 128

  def setup(self):
    self.tower = VisionTower(self.vision)
    self.probe = self.param("probe", nn.initializers.normal(0.02),
                            (1, 1, self.vision.hidden_size))
    self.pool = nn.MultiHeadDotProductAttention(self.vision.num_heads)
    self.text_encoder = TextEncoder(self.vocab_size)
    self.question_query = nn.Dense(self.vision.hidden_size)
    self.img_proj = nn.Dense(self.embed_dim)
    self.txt_proj = nn.Dense(self.embed_dim)
    self.log_t = self.param("log_t", lambda _: jnp.asarray(INIT_LOG_T, jnp.float32))
    self.bias = self.param("bias", lambda _: jnp.asarray(INIT_BIAS, jnp.float32))
    self.qa_log_t = self.param("qa_log_t", lambda _: jnp.asarray(INIT_LOG_T, jnp.float32))
    self.qa_bias = self.param("qa_bias", lambda _: jnp.zeros((), jnp.float32))
    self.dense_norm = nn.LayerNorm()
    self.dense_head = nn.Dense(sum(DENSE_CLASSES))

  def _pooled(self, h: jax.Array, q_ids: jax.Array | None, q_mask: jax.Array | None
              ) -> jax.Array:
    """Post-normed tower states h (B, N, Dv) -> (B, E), pooled by the probe [+ question]."""
    if q_ids is None:
      q = jnp.broadcast_to(self.probe, (h.shape[0], 1, h.shape[-1]))
    else:
      q = self.probe + self.question_query(self.text_encoder(q_ids, q_mask))[:, None]
    return l2_normalize(self.img_proj(self.pool(q, h)[:, 0]))

  def _states(self, pixels: jax.Array) -> jax.Array:
    return self.tower.post_norm(self.tower(pixels)[-1])

  def image(self, pixels: jax.Array, q_ids: jax.Array | None = None,
            q_mask: jax.Array | None = None) -> jax.Array:
    """pixels (B, H, W, 3) normalised [, question ids / mask (B, Tq) as the pooling query]
    -> (B, E)."""
    return self._pooled(self._states(pixels), q_ids, q_mask)

  def dense(self, hidden: jax.Array) -> jax.Array:
    """(B, N, Dv) patch tokens -> (B, N, sum(DENSE_CLASSES)) logits."""
    return self.dense_head(self.dense_norm(hidden))

  def dense_of(self, pixels: jax.Array) -> jax.Array:
    """pixels (B, H, W, 3) normalised -> dense logits of the last layer FUSION keeps."""
    return self.dense(self.tower(pixels)[-2])

  def image_both(self, pixels: jax.Array, q_ids: jax.Array, q_mask: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One tower pass -> (image (B, E), image pooled with the question (B, E), dense logits
    (B, N, C) from the last layer FUSION keeps)."""
    hs = self.tower(pixels)
    h = self.tower.post_norm(hs[-1])
    return self._pooled(h, None, None), self._pooled(h, q_ids, q_mask), self.dense(hs[-2])

  def text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids / mask (..., T) -> (..., E)."""
    lead = ids.shape[:-1]
    x = self.text_encoder(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]))
    return l2_normalize(self.txt_proj(x)).reshape(*lead, -1)

  def __call__(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array):
    """-> (image (B, E), text (B, E), image pooled with the text as question (B, E), dense
    logits (B, N, C))."""
    img, img_q, dense = self.image_both(pixels, ids, mask)
    return img, self.text(ids, mask), img_q, dense


def normalize(images: np.ndarray) -> jax.Array:
  """uint8 (B, H, W, 3) -> (x / 255 - 0.5) / 0.5 as FUSION feeds its tower."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5


def qa_facts(items: Sequence[Item], encode: Callable[[str], list[int]], pad_id: int
             ) -> dict[str, np.ndarray]:
  """Every closed turn of the items: its question and its candidate answers, tokenised.

  Returns item (M,), answer (M,) index of the right candidate, q_ids / q_mask (M, Tq),
  a_ids / a_mask (M, K, Ta), valid (M, K), start (N + 1,) (item i's turns are
  start[i]:start[i + 1]): M closed turns in item order, K the most candidates of any turn.
  """
  rows = [(i, q, cands, cands.index(a)) for i, it in enumerate(items)
          for (q, a), cands in zip(it.qa, it.choices) if len(cands) >= 2 and a in cands]
  if not rows:
    raise ValueError("pretrain.tower.qa_facts: no closed question with candidates in the items")
  k = max(len(r[2]) for r in rows)
  q_ids, q_mask = pad_rows([encode(r[1]) for r in rows], pad_id)
  flat = [encode(c) for r in rows for c in r[2]]
  a_ids, a_mask = pad_rows(flat, pad_id)
  valid = np.zeros((len(rows), k), bool)
  full = np.full((len(rows), k, a_ids.shape[1]), pad_id, np.int32)
  full_mask = np.zeros(full.shape, bool)
  n = 0
  for m, r in enumerate(rows):
    c = len(r[2])
    full[m, :c], full_mask[m, :c], valid[m, :c] = a_ids[n:n + c], a_mask[n:n + c], True
    n += c
  item = np.array([r[0] for r in rows])
  return dict(item=item, answer=np.array([r[3] for r in rows]), q_ids=q_ids, q_mask=q_mask,
              a_ids=full, a_mask=full_mask, valid=valid,
              start=np.searchsorted(item, np.arange(len(items) + 1)))


def label_codes(object_labels: np.ndarray) -> np.ndarray:
  """(..., H, W) int64 object code per pixel of synth.render.object_labels' (..., H, W, 2)
  classes: shape class * DENSE_CLASSES[1] + colour class, 0 where no object is drawn (one code
  per distinct shape and colour; `code // DENSE_CLASSES[1]` is the shape class)."""
  return object_labels[..., 0].astype(np.int64) * DENSE_CLASSES[1] + object_labels[..., 1]


def object_code(shape: str, color: str) -> int:
  """`label_codes`' code of an object of this shape and colour."""
  return (1 + SHAPES.index(shape)) * DENSE_CLASSES[1] + 1 + COLORS.index(color)


def patch_labels(items: Sequence[Item], patch: int) -> np.ndarray:
  """(N, P, 3) int32 dense targets, patches row-major as the tower's tokens: the shape and
  colour class (DENSE_CLASSES) of the object covering most of the patch (0 when none covers
  MIN_COVER of it) and the background pattern; -1 (ignored) where an item lacks them."""
  n = len(items)
  h, w = items[0].image.shape[:2]
  gh, gw = h // patch, w // patch
  labels = np.stack([it.object_labels if it.object_labels is not None
                     else np.zeros((h, w, 2), np.uint8) for it in items])
  code = label_codes(labels)  # 0 = none
  code = (code[:, :gh * patch, :gw * patch].reshape(n, gh, patch, gw, patch)
          .transpose(0, 1, 3, 2, 4).reshape(n * gh * gw, patch * patch))
  k = DENSE_CLASSES[0] * DENSE_CLASSES[1]
  counts = np.bincount((np.arange(code.shape[0])[:, None] * k + code).ravel(),
                       minlength=code.shape[0] * k).reshape(-1, k)
  counts[:, 0] = 0
  best = np.where(counts.max(1) >= MIN_COVER * patch * patch, counts.argmax(1), 0)
  out = np.stack([best // DENSE_CLASSES[1], best % DENSE_CLASSES[1],
                  np.repeat([it.pattern for it in items], gh * gw)], -1)
  out = out.reshape(n, gh * gw, 3).astype(np.int32)
  out[[it.object_labels is None for it in items], :, :2] = -1
  return out


def dense_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits (B, P, sum(DENSE_CLASSES)), labels (B, P, 3) (-1 ignored) -> (loss, (3,)
  accuracies: shape and colour on the patches an object covers, pattern on all).

  loss: per target the mean cross entropy over its known patches; shape and colour add their
  mean over the patches an object covers, which are a few of the 16 and otherwise weigh little
  next to the easy "no object" ones."""
  total, accs, off = 0.0, [], 0
  mean = lambda x, w: jnp.sum(x * w) / jnp.maximum(w.sum(), 1.0)  # noqa: E731
  for k, c in enumerate(DENSE_CLASSES):
    lg = logits[..., off:off + c].astype(jnp.float32)
    off += c
    y = labels[..., k]
    valid = (y >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))
    scored = valid if k == 2 else (y > 0).astype(jnp.float32)
    total = total + mean(ce, valid) + (mean(ce, scored) if k < 2 else 0.0)
    accs.append(mean(jnp.argmax(lg, -1) == y, scored))
  return total, jnp.stack(accs)


def dense_accuracy(vision: VisionConfig, params: dict[str, Any], images: np.ndarray,
                   labels: np.ndarray, vocab_size: int) -> np.ndarray:
  """(3,) accuracies of the dense head (see `dense_loss`) on these images."""
  logits = DualEncoder(vision, vocab_size).apply({"params": params}, normalize(images),
                                                 method=DualEncoder.dense_of)
  return np.asarray(dense_loss(logits, jnp.asarray(labels))[1])


FACT_KEYS = ("answer", "q_ids", "q_mask", "a_ids", "a_mask", "valid")


def sample_facts(facts: dict[str, np.ndarray], idx: np.ndarray, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
  """For items idx (B,): one of its closed turns each (FACT_KEYS rows) and weight (B,) (0: the
  item has none; its row is turn 0's, ignored)."""
  lo, hi = facts["start"][idx], facts["start"][idx + 1]
  has = hi > lo
  m = np.where(has, lo + np.floor(rng.random(len(idx)) * np.maximum(hi - lo, 1)).astype(int), 0)
  return {**{k: facts[k][m] for k in FACT_KEYS}, "weight": has.astype(np.float32)}


def train_tower(vision: VisionConfig, images: np.ndarray, captions: np.ndarray,
                caption_mask: np.ndarray, facts: dict[str, np.ndarray], vocab_size: int, *,
                dense: np.ndarray | None = None, dense_weight: float = 1.0,
                steps: int, batch: int = 256, lr: float = 1e-3, seed: int = 0,
                log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[float]]:
  """Trains the dual encoder; returns (its params, loss per step); ["tower"] ships.

  images (N, H, W, 3) uint8; captions / caption_mask (N, T) token ids / validity; facts from
  `qa_facts` over the same N items; dense (N, P, 3) from `patch_labels` (None: no dense term).
  """
  if dense is None:
    dense = np.full((images.shape[0], 1, 3), -1, np.int32)
    dense_weight = 0.0
  model = DualEncoder(vision, vocab_size)
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), normalize(images[:2]), captions[:2],
                      caption_mask[:2])["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
  state = opt.init(params)

  def loss_fn(p, pix, ids, mask, f, labels):
    apply = lambda *a, method: model.apply({"params": p}, *a, method=method)  # noqa: E731
    img, img_q, logits = apply(pix, f["q_ids"], f["q_mask"], method=DualEncoder.image_both)
    cap = apply(ids, mask, method=DualEncoder.text)
    cands = apply(f["a_ids"], f["a_mask"], method=DualEncoder.text)
    l_cap = sigmoid_loss(img, cap, p["log_t"], p["bias"])
    l_qa = candidate_sigmoid_loss(img_q, cands, f["answer"], f["valid"], p["qa_log_t"],
                                  p["qa_bias"], f["weight"])
    if dense_weight:
      l_dense, acc = dense_loss(logits, labels)
    else:
      l_dense, acc = jnp.zeros(()), jnp.zeros((3,))
    return l_cap + l_qa + dense_weight * l_dense, (l_cap, l_qa, l_dense, acc)

  @jax.jit
  def step(params, state, pix, ids, mask, f, labels):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, pix, ids, mask, f,
                                                                     labels)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, parts

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
    f = sample_facts(facts, idx, rng)
    params, state, loss, (l_cap, l_qa, l_dense, acc) = step(
        params, state, normalize(images[idx]), captions[idx], caption_mask[idx], f,
        dense[idx])
    losses.append(float(loss))
    if (i + 1) % max(1, steps // 10) == 0 or i == 0:
      log(f"tower step {i + 1}/{steps}: loss {losses[-1]:.4f} (captions {float(l_cap):.3f}, "
          f"QA facts {float(l_qa):.3f}, dense {float(l_dense):.3f}: shape / colour / pattern "
          f"{' / '.join(f'{a:.2f}' for a in np.asarray(acc))}; t "
          f"{float(np.exp(params['log_t'])):.1f}, b {float(params['bias']):.2f}, "
          f"{time.time() - t0:.0f} s)")
  return jax.tree.map(np.asarray, params), losses


def fact_accuracy(vision: VisionConfig, params: dict[str, Any], images: np.ndarray,
                  facts: dict[str, np.ndarray], vocab_size: int) -> float:
  """Share of the closed turns of these images whose right candidate scores highest
  (1 / candidates by chance)."""
  model = DualEncoder(vision, vocab_size)
  apply = lambda *a, method: np.asarray(model.apply({"params": params}, *a, method=method))  # noqa: E731
  img = apply(normalize(images[facts["item"]]), facts["q_ids"], facts["q_mask"],
              method=DualEncoder.image)
  cands = apply(facts["a_ids"], facts["a_mask"], method=DualEncoder.text)
  scores = np.where(facts["valid"], np.einsum("md,mkd->mk", img, cands), -np.inf)
  return float(np.mean(np.argmax(scores, axis=1) == facts["answer"]))


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
