"""FUSION: the whole model (docs/model.md §3-8) as one Linen module and a pure `apply`.

    images ──► static_hd crops [TL, TR, BL, BR, full]
                 full ──► text-guided tower (instructions via aux_projector) ──► connector
                          ──► mm_projector ──► N image tokens  +  instruction features (loss)
                 tiles ─► plain tower ──► connector ──► mm_projector ──► 2x2 mosaic (context)
    mosaic ──► adaptive max pool ──► q latent inits;  (w sqrt q)^2 pool ──► q context windows
    input_ids ──► embed; image tokens into the image slot, latents into the latent slots
              ──► LLM decoder, an interaction layer after layers start + j*stride ──► logits

Batch contract: fusion_jax/models/batch_spec.py (keys, shapes, dtypes, padding). B rows of S
tokens, each holding up to P samples (P = 1: one sample per row); per-sample keys carry the
(B, P) axes. The model keeps samples apart: attention is causal within a segment
(segment_ids), positions restart per sample, the tower encodes the B*P sample slots (empty
slots too: shapes are static), and each sample's image tokens, latents, context windows,
interaction layers and mapping-loss terms are its own.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusion_jax import config_util
from fusion_jax.models import batch_spec, global_context
from fusion_jax.models import query_len as query_len_lib
from fusion_jax.models.connector import AuxProjector, MMProjector
from fusion_jax.models.interaction import InteractionLayer, apply_interaction
from fusion_jax.models.llm import Decoder
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.models.lm_head import LMHead, lm_head_kernel, loss_vocab_pad
from fusion_jax.models.mapping_loss import fusion_loss
from fusion_jax.models.text_guided import text_guided_features
from fusion_jax.models.vision import VisionConfig, VisionTower
from fusion_jax.parallel.sharding import constrain

VISION_TEXT_MASKS = ("faithful", "block_vision_to_text")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """A FUSION model: LLM + tower + the FUSION-specific modules and switches.

  `vision.num_layers` is the number of tower layers RUN (the checkpoint's L-1: FUSION drops the
  last one). Ablation switches turn one mechanism off each, for the paper's ablation at any
  scale: `text_guidance` (tower sees no instructions; no text mapping term), `interaction`
  (no interaction layers), `mapping_loss` (CE only), `latents` (latent slots masked out of
  attention, as if absent, and nothing for interaction layers to refine).
  """
  llm: LLMConfig
  vision: VisionConfig
  query_len: tuple[int, ...] = query_len_lib.CANDIDATES
  window_size: int = 3
  num_interaction: int = 10
  interaction_start: int = 0
  interaction_stride: int = 3
  interaction_heads: int = 16
  vision_text_mask: str = "faithful"
  mapping_weight: float = 0.1
  # Faithful: text-only dummy images count in vision_map; False excludes them (corrected).
  vision_map_text_only: bool = True
  max_instruct_len: int = 256
  # FUSION-L: at inference, resize the image token grid to this side (0 = off; authors: 12).
  fusion_l_grid: int = 0
  template: str = "phi_3"
  text_guidance: bool = True
  interaction: bool = True
  mapping_loss: bool = True
  latents: bool = True

  def __post_init__(self):
    if self.vision_text_mask not in VISION_TEXT_MASKS:
      raise ValueError(f"FusionConfig.vision_text_mask={self.vision_text_mask!r}; "
                       f"choose one of {VISION_TEXT_MASKS}")
    query_len_lib.check(self.query_len, "FusionConfig", window=self.window_size,
                        mosaic_side=2 * self.vision.grid_size)
    if self.llm.hidden_size % self.interaction_heads:
      raise ValueError(f"FusionConfig: interaction_heads {self.interaction_heads} must divide "
                       f"the LLM width {self.llm.hidden_size}")

  @property
  def num_image_tokens(self) -> int:
    """Image tokens in the sequence: N, or the FUSION-L grid when set."""
    return self.fusion_l_grid**2 if self.fusion_l_grid else self.vision.num_patches

  @property
  def interaction_layers(self) -> tuple[int, ...]:
    """Decoder layer indices followed by an interaction layer (past-the-depth ones skipped)."""
    if not self.interaction:
      return ()
    idx = (self.interaction_start + j * self.interaction_stride for j in range(self.num_interaction))
    return tuple(i for i in idx if i < self.llm.num_layers)

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["llm"], d["vision"] = self.llm.to_dict(), self.vision.to_dict()
    d["query_len"] = list(self.query_len)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> FusionConfig:
    return config_util.from_dict(cls, d, "FusionConfig", convert={
        "llm": lambda v: v if isinstance(v, LLMConfig) else LLMConfig.from_dict(v),
        "vision": lambda v: v if isinstance(v, VisionConfig) else VisionConfig.from_dict(v),
        "query_len": query_len_lib.parse})

  def replace(self, **kw) -> FusionConfig:
    return dataclasses.replace(self, **kw)


def scanned_interaction_layers(cfg: FusionConfig) -> tuple[int, ...]:
  """Decoder layers whose interaction layer runs inside the scanned stack (scan_layers only;
  () when the interaction layers never run: ablated, or no latents to refine)."""
  if not cfg.llm.scan_layers or not cfg.latents:
    return ()
  return cfg.interaction_layers


def normalize_images(images: jax.Array, has_image: jax.Array, dtype) -> jax.Array:
  """uint8 (B, 5, H, W, 3) -> (x/255 - 0.5)/0.5, and exact zeros for text-only samples."""
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  x = (x - 0.5) / 0.5
  return jnp.where(has_image[:, None, None, None, None], x, 0.0).astype(dtype)


def _scatter_rows(h: jax.Array, dst: jax.Array, values: jax.Array) -> jax.Array:
  """h (B, S, D) with h[b, dst[b, i]] = values[b, i]; dst >= S (or < 0 mapped there) drops."""
  s = h.shape[1]
  dst = jnp.where(dst >= 0, dst, s)
  # Per row (vmap): a batched scatter stays batch-sharded (fusion_jax.models.interaction).
  return jax.vmap(lambda hr, dr, vr: hr.at[dr].set(vr, mode="drop"))(h, dst, values.astype(h.dtype))


class Fusion(nn.Module):
  """The FUSION model. Parameter tree:

    llm/...               decoder (fusion_jax.models.llm)
    vision_tower/...      SigLIP tower, L-1 layers (fusion_jax.models.vision)
    mm_projector/...      vision -> LLM (3Dv -> D -> D)
    aux_projector/...     LLM -> vision (D -> Dv -> Dv)
    interaction_{j}/...   j-th interaction layer (torch: model.vision_sampler_layers.{j})
  """
  config: FusionConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.llm.dtype), param_dtype=jnp.dtype(cfg.llm.param_dtype))
    if cfg.llm.scan_layers:
      # Scanned: interaction layers run inside the decoder's scanned groups (llm/.../block).
      self.llm = Decoder(cfg.llm, hook_layers=scanned_interaction_layers(cfg),
                         hook_block=functools.partial(InteractionLayer, cfg.interaction_heads, **kw))
      self.interaction = []
    else:
      self.llm = Decoder(cfg.llm)
      self.interaction = [InteractionLayer(cfg.interaction_heads, **kw)
                          for _ in cfg.interaction_layers]
    self.vision_tower = VisionTower(cfg.vision)
    self.mm_projector = MMProjector(cfg.llm.hidden_size, **kw)
    self.aux_projector = AuxProjector(cfg.vision.hidden_size, **kw)

  def encode_images(self, images: jax.Array, has_image: jax.Array, instructs: jax.Array,
                    instructs_mask: jax.Array) -> dict[str, jax.Array]:
    """Both vision passes, per sample: images (M, 5, H, W, 3), has_image (M,), instructs and
    instructs_mask (M, T) for M samples (the B*P sample slots of a batch).

    Returns a dict with image_tokens (M, N, D), mosaic (M, 2g, 2g, D), patch_embeds (M, N, Dv)
    (hs[0] of the full view), instruct_embeds (M, T, D), instruct_feats (M, T, D) or None.
    """
    cfg = self.config
    b = images.shape[0]
    pix = normalize_images(images, has_image, jnp.dtype(cfg.vision.dtype))
    hw = pix.shape[2:]
    embeds = self.vision_tower.embed(pix.reshape(b * 5, *hw)).reshape(b, 5, -1, cfg.vision.hidden_size)
    n = embeds.shape[2]
    patch_embeds = embeds[:, 4]
    instruct_embeds = self.llm.embed(instructs)
    if cfg.text_guidance:
      text_states = self.aux_projector(instruct_embeds)
      feats = text_guided_features(self.vision_tower, patch_embeds, text_states, instructs_mask,
                                   cfg.vision_text_mask)
    else:
      feats = self.vision_tower.features(patch_embeds)
    full = self.mm_projector(feats)  # (B, N [+ T], D)
    image_tokens = constrain(full[:, :n], ("batch", "length", "embed"))
    instruct_feats = full[:, n:] if cfg.text_guidance else None
    # Tiles: encoded without text, (B*4, N, Dv) -> (B, 4, N, D) -> 2x2 mosaic.
    tiles = self.vision_tower.features(embeds[:, :4].reshape(b * 4, n, -1))
    tile_tokens = self.mm_projector(tiles).reshape(b, 4, n, -1)
    return dict(image_tokens=image_tokens, mosaic=global_context.mosaic(tile_tokens),
                patch_embeds=patch_embeds, instruct_embeds=instruct_embeds,
                instruct_feats=instruct_feats)

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = True,
               logits: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Full-sequence forward (training, scoring). Returns (logits (B, S, V), aux), or with
    logits=False the decoder's final hidden states (B, S, D) in the logits' place (the training
    loss projects them itself: `lm_head`, fusion_jax.parallel.cross_entropy)."""
    out, aux, _ = self._forward(batch, train=train, cache=None, head=logits)
    return out, aux

  def prefill(self, batch: Mapping[str, jax.Array], cache: dict[str, Any],
              logits_at: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Generation, step 1: the whole prompt batch (interaction layers included) into an empty
    KV cache (fusion_jax.models.llm.init_cache). Returns (logits (B, S, V), cache), or with
    logits_at ((B,) int: each row's position) only those positions' logits (B, V): the LM
    head runs on B tokens, not B x S (a generator needs the last prompt token's only)."""
    out, _, new_cache = self._forward(batch, train=False, cache=cache, head=logits_at is None)
    if logits_at is not None:
      hidden = jnp.take_along_axis(out, logits_at[:, None, None].astype(jnp.int32), axis=1)
      out = self.llm.logits(hidden)[:, 0]
    return out, new_cache

  def decode(self, input_ids: jax.Array, positions: jax.Array, cache: dict[str, Any]
             ) -> tuple[jax.Array, dict[str, Any]]:
    """Generation, later steps: (B, 1) new token ids at (B, 1) positions -> (logits (B, 1, V),
    cache). The LLM alone: interaction layers never run on single-token decode
    (docs/model.md §7)."""
    return self.llm.forward(input_ids, positions, jnp.ones(input_ids.shape, jnp.bool_),
                            cache=cache)

  def _forward(self, batch: Mapping[str, jax.Array], *, train: bool,
               cache: dict[str, Any] | None, head: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any] | None]:
    cfg = self.config
    b, p, lq = batch["question_pos"].shape
    q = batch["latent_pos"].shape[2] // lq
    # Every sample slot is one tower sample: (B, P, ...) -> (B*P, ...).
    flat = lambda x: x.reshape((b * p,) + x.shape[2:])  # noqa: E731
    vis = self.encode_images(flat(batch["images"]), flat(batch["has_image"]),
                             flat(batch["instructs"]), flat(batch["instructs_mask"]))
    image_tokens = vis["image_tokens"]
    seq_tokens = image_tokens
    if cfg.fusion_l_grid:
      if train:
        raise ValueError("FusionConfig.fusion_l_grid (FUSION-L) is an inference option: train "
                         "the FUSION-X model (fusion_l_grid=0) and evaluate with it set")
      seq_tokens = global_context.resize_image_tokens(image_tokens, cfg.fusion_l_grid)

    h = self.llm.embed(batch["input_ids"])
    has_image = batch["has_image"]  # (B, P)
    n_seq = seq_tokens.shape[1]
    start = jnp.where(has_image, batch["image_start"], -1)[:, :, None]  # (B, P, 1)
    img_dst = jnp.where(start >= 0, start + jnp.arange(n_seq), -1).reshape(b, p * n_seq)
    h = _scatter_rows(h, img_dst, seq_tokens.reshape(b, p * n_seq, -1))

    mosaic = vis["mosaic"]  # (B*P, 2g, 2g, D)
    token_mask = jnp.asarray(batch["token_mask"])
    latent_pos = batch["latent_pos"].reshape(b, p * lq * q)
    if cfg.latents:
      init = global_context.latent_init(mosaic, q).reshape(b, p, q, -1)
      init = jnp.where(has_image[:, :, None, None], init, 0.0)  # text-only: q zero vectors
      h = _scatter_rows(h, latent_pos, jnp.tile(init, (1, 1, lq, 1)).reshape(b, p * lq * q, -1))
    else:
      # Ablation: latent slots are masked out of attention (as if absent; positions unchanged).
      rows = jnp.arange(h.shape[0])[:, None]
      dst = jnp.where(latent_pos >= 0, latent_pos, h.shape[1])
      token_mask = token_mask.at[rows, dst].set(False, mode="drop")
    h = constrain(h, ("batch", "length", "embed"))

    hook, hook_ctx = None, None
    if scanned_interaction_layers(cfg) or (self.interaction and cfg.latents):
      # Each sample's latents see its own context windows (B, P, q, w*w, D).
      windows = global_context.context_windows(mosaic, q, cfg.window_size)
      windows = windows.reshape((b, p) + windows.shape[1:])
    if scanned_interaction_layers(cfg):
      hook_ctx = dict(question_pos=batch["question_pos"], latent_pos=batch["latent_pos"],
                      windows=windows)
    elif self.interaction and cfg.latents:
      layer_of = {i: j for j, i in enumerate(cfg.interaction_layers)}

      def hook(i: int, x: jax.Array) -> jax.Array:
        if i not in layer_of:
          return x
        return apply_interaction(self.interaction[layer_of[i]], x, batch["question_pos"],
                                 batch["latent_pos"], windows)

    # The batch contract keeps each sample's tokens contiguous from the row start, unless the
    # latents ablation masked its latent slots out of the middle of the row.
    hidden, new_cache = self.llm(h, batch["positions"], token_mask, cache=cache, hook=hook,
                                 hook_ctx=hook_ctx, segment_ids=batch["segment_ids"],
                                 prefix_rows=cfg.latents, samples_per_row=p)
    logits = self.llm.logits(hidden) if head else hidden
    # Loss inputs per sample slot: (B, P, ...).
    unflat = lambda x: None if x is None else x.reshape((b, p) + x.shape[1:])  # noqa: E731
    aux = dict(patch_embeds=unflat(vis["patch_embeds"]),
               projected_back=unflat(self.aux_projector(image_tokens)),
               instruct_embeds=unflat(vis["instruct_embeds"]),
               instruct_feats=unflat(vis["instruct_feats"]))
    return logits, aux, new_cache


def init(rng: jax.Array, cfg: FusionConfig, batch: Mapping[str, Any]) -> Any:
  """Boxed (nn.Partitioned) variables for `cfg`; `batch` may hold ShapeDtypeStructs (eval_shape)."""
  return Fusion(cfg).init(rng, batch)


def apply(params: Any, batch: Mapping[str, jax.Array], cfg: FusionConfig, *, q: int | None = None,
          train: bool = True, logits: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits (B, S, V) and aux (per-sample loss inputs, (B, P, ...)) for a batch; q checked
  against the batch shapes. logits=False: the final hidden states (B, S, D) in their place."""
  lq = batch["question_pos"].shape[2]
  implied = batch["latent_pos"].shape[2] // max(lq, 1)
  if q is not None and q != implied:
    raise ValueError(f"fusion.apply: q={q} but latent_pos {batch['latent_pos'].shape} with "
                     f"{lq} questions implies q={implied}; lay the batch out with the same q")
  return Fusion(cfg).apply({"params": params}, batch, train=train, logits=logits)


def prefill(params: Any, batch: Mapping[str, jax.Array], cfg: FusionConfig,
            cache: dict[str, Any], logits_at: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, Any]]:
  """Fusion.prefill as a pure function: (logits (B, S, V), filled cache); with logits_at (B,)
  only those positions' logits (B, V)."""
  return Fusion(cfg).apply({"params": params}, batch, cache, logits_at, method=Fusion.prefill)


def decode(params: Any, input_ids: jax.Array, positions: jax.Array, cfg: FusionConfig,
           cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
  """Fusion.decode as a pure function: (logits (B, 1, V), cache)."""
  return Fusion(cfg).apply({"params": params}, input_ids, positions, cache, method=Fusion.decode)


def vision_map_samples(batch: Mapping[str, jax.Array], cfg: FusionConfig) -> jax.Array:
  """(B, P) bool: the sample slots vision_map averages over. Every filled slot (faithful: the
  dummy images of text-only samples count), or only those with an image (corrected option);
  empty slots of packed rows never count."""
  filled = batch_spec.sample_mask(batch["segment_ids"], batch["has_image"].shape[1])
  return filled if cfg.vision_map_text_only else filled & batch["has_image"]


def lm_head(params: Any, cfg: FusionConfig, loss_chunks: int = 1,
            pad_to: int | None = None) -> LMHead:
  """The training loss's LM head (mapping_loss.loss_terms' `head`): the loss projects the
  hidden states that apply(..., logits=False) returns, in `loss_chunks` token chunks
  (config.loss_chunks), its width padded to a multiple of `pad_to` (None: lm_head.loss_vocab_pad,
  128 on GPU and TPU, 1 on CPU)."""
  return LMHead(lm_head_kernel(params["llm"], cfg.llm), jnp.dtype(cfg.llm.dtype),
                max(int(loss_chunks), 1), loss_vocab_pad() if pad_to is None else pad_to)


def loss_fn(params: Any, batch: Mapping[str, jax.Array], cfg: FusionConfig, *, train: bool = True,
            loss_chunks: int = 1, vocab_pad: int | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """docs/model.md §8: CE + lambda * (text_map + vision_map). Returns (loss, aux of scalars).
  The loss projects the hidden states itself (`lm_head`: loss_chunks, vocab_pad)."""
  head = lm_head(params, cfg, loss_chunks, vocab_pad)
  hidden, out = apply(params, batch, cfg, train=train, logits=False)
  t_embeds, t_feats, t_mask = out["instruct_embeds"], out["instruct_feats"], batch["instructs_mask"]
  if t_feats is None:  # text guidance off: no instruction features, no text mapping term
    t_feats, t_mask = t_embeds, jnp.zeros_like(t_mask)
  weight = cfg.mapping_weight if cfg.mapping_loss else 0.0
  sample_mask = vision_map_samples(batch, cfg)
  return fusion_loss(hidden, batch["labels"], t_embeds, t_feats, t_mask, out["patch_embeds"],
                     out["projected_back"], sample_mask=sample_mask, mapping_weight=weight,
                     head=head)


def example_samples(cfg: FusionConfig, count: int, *, seq_len: int, max_questions: int, q: int,
                    seed: int = 0, first: int = 0) -> list[dict[str, Any]]:
  """`count` structurally valid examples (batch_spec's per-sample form, (seq_len,) rows).

  Example i (numbered from `first`) lays out [text][image slot N][latents q][question text]
  ... per question with labels on the text after each question; odd examples are text-only.
  """
  import numpy as np  # host-side helper
  rng = np.random.default_rng(seed)
  s, lq, t = seq_len, max_questions, cfg.max_instruct_len
  n, v, size = cfg.num_image_tokens, cfg.llm.vocab_size, cfg.vision.image_size
  out = []
  dims = batch_spec.Dims(batch_size=1, seq_len=s, samples_per_row=1, max_questions=lq, q=q,
                         instruct_len=t, image_size=size)
  for i in range(first, first + count):
    ex = batch_spec.empty_example(dims)
    image = i % 2 == 0
    pos = 2
    if image:
      ex["has_image"] = np.asarray(True)
      ex["image_start"] = np.asarray(pos, np.int32)
      ex["images"] = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
      pos += n
    nq = 1 + (i % lq)
    for l in range(nq):
      if pos + q + 6 > s:
        break
      ex["latent_pos"][l * q:(l + 1) * q] = np.arange(pos, pos + q)
      pos += q + 3
      ex["question_pos"][l] = pos - 1
      ex["labels"][pos:pos + 3] = rng.integers(1, v, 3)
      pos += 3
    length = min(pos, s)
    ex["token_mask"][:length] = True
    ex["positions"][:length] = np.arange(length)
    ids = rng.integers(1, v, s).astype(np.int32)
    sup = ex["labels"] >= 0
    ids[sup] = ex["labels"][sup]
    ex["input_ids"] = np.where(ex["token_mask"], ids, 0).astype(np.int32)
    nt = int(rng.integers(0, t + 1)) if image else 0
    ex["instructs"][:nt] = rng.integers(1, v, nt)
    ex["instructs_mask"][:nt] = True
    out.append(ex)
  return out


def init_batch(cfg: FusionConfig) -> dict[str, Any]:
  """The smallest valid all-padding batch (1 row of 8 tokens, 1 question, the smallest q):
  parameters do not depend on B, S, P or q, so init and abstract shapes use this one."""
  return example_batch(cfg, batch_size=1, seq_len=8, max_questions=1, q=min(cfg.query_len),
                       seed=None)


def example_batch(cfg: FusionConfig, *, batch_size: int, seq_len: int, max_questions: int, q: int,
                  seed: int | None = 0, samples_per_row: int = 1) -> dict[str, Any]:
  """A structurally valid batch (numpy, batch_spec contract) for init, benchmarks and tests.

  P = samples_per_row examples (`example_samples`, each within seq_len // P tokens) per row;
  `seed=None` gives an all-padding batch (shapes only, e.g. for init).
  """
  p = samples_per_row
  if seed is None:
    return batch_spec.zeros(batch_spec.Dims(
        batch_size=batch_size, seq_len=seq_len, samples_per_row=p, max_questions=max_questions,
        q=q, instruct_len=cfg.max_instruct_len, image_size=cfg.vision.image_size))
  exs = example_samples(cfg, batch_size * p, seq_len=seq_len // p, max_questions=max_questions,
                        q=q, seed=seed)
  if p == 1:
    return batch_spec.stack_examples(exs)
  return batch_spec.pack_examples([exs[r * p:(r + 1) * p] for r in range(batch_size)],
                                  seq_len=seq_len, samples_per_row=p, pad_id=0)
