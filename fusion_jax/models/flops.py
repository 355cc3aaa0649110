"""Analytical FLOPs of a FUSION train step: the MFU numerator (denominator: peak_flops).

One formula shared by the MFU benchmark (benchmarks/step_mfu.py), the AOT report and the
trainer's MFU log. It counts matmul FLOPs only (2 m n k per (m, k) @ (k, n)); norms, softmax,
activations, pooling and the loss are left out (well under 1 % at paper widths).

Counted, per train step of `batch` rows of `seq_len` tokens (padding included: it is computed):
  llm          decoder layers' q/k/v/o projections and SwiGLU MLP, plus the LM head
  llm_attn     QK^T and PV of the decoder's causal self attention: 2 * 2 * S^2/2 * H * hd per
               row per layer (the causal half, as MaxText counts it; the XLA path computes the
               full square, twice this, but the other half is masked waste, not model FLOPs)
  tower        SigLIP layers (projections, MLP, bidirectional attention) and the patch conv, on
               5 crops per image: 4 tiles of N tokens, the full view of N + T tokens (T
               instruction tokens appended by text guidance)
  projectors   mm_projector on 4N tile tokens + N + T full-view tokens; aux_projector on the T
               instruction embeddings and on the N image tokens (the vision-mapping loss)
  interaction  each interaction layer: proj_in / q / o / proj_out on Lq*q latent slots,
               proj_context / k / v on the q w*w-token windows, the window cross attention

Training = forward + backward (2x forward) = 3x forward ("model" FLOPs, the MFU numerator).
With remat, the rematerialised blocks (decoder layers, tower layers) run their forward once
more in the backward pass: "hardware" FLOPs = model + that recompute (HFU numerator). A chunked
loss (config.loss_chunks > 1) recomputes the LM head's forward too.

Peak table (fusion_jax/parallel/devices.py): dense bf16 FLOP/s per chip from the vendors' data
sheets (no sparsity).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

# The per-chip peak table lives with the devices (the generic trainer's MFU reads it too);
# re-exported here for the MFU benchmark and the AOT report.
from fusion_jax.parallel.devices import PEAK_TFLOPS, peak_flops  # noqa: F401

if TYPE_CHECKING:  # fusion.py imports heavy model code; flops needs only the config's fields.
  from fusion_jax.models.fusion import FusionConfig
  from fusion_jax.models.llm_config import LLMConfig


def llm_layer_flops(cfg: LLMConfig, tokens: int) -> float:
  """Forward matmul FLOPs of ONE decoder layer's weights (no attention scores) on `tokens`."""
  d, hd = cfg.hidden_size, cfg.head_dim
  qo = 2 * d * cfg.num_heads * hd
  kv = 2 * d * cfg.num_kv_heads * hd
  mlp = 3 * d * cfg.intermediate_size
  return 2.0 * tokens * (qo + kv + mlp)


def causal_attention_flops(cfg: LLMConfig, batch: float, seq_len: float) -> float:
  """Forward QK^T + PV FLOPs of one decoder layer, causal half: 2 * 2 * B * S^2/2 * H * hd."""
  return 2.0 * batch * seq_len * seq_len * cfg.num_heads * cfg.head_dim


def llm_train_flops(cfg: LLMConfig, *, batch: int, seq_len: int, remat: bool = True,
                    segments_per_row: int = 1) -> dict[str, float]:
  """The decoder alone (also the PyTorch Phi-3 baseline's step): forward by part, `model`
  (3 x forward) and `remat` (decoder layers' forward again; the LM head is not remat'd).
  Packed rows of `segments_per_row` equal segments attend within each segment only."""
  tokens = batch * seq_len
  head = 2.0 * tokens * cfg.hidden_size * cfg.vocab_size
  layers = cfg.num_layers * llm_layer_flops(cfg, tokens)
  seg = seq_len / segments_per_row
  attn = cfg.num_layers * causal_attention_flops(cfg, batch * segments_per_row, seg)
  fwd = {"llm": layers + head, "llm_attn": attn}
  model = 3.0 * (layers + head + attn)
  return {"fwd": fwd, "model": model, "remat": (layers + attn) if remat else 0.0}


def train_step_flops(cfg: FusionConfig, *, batch: int, seq_len: int, q: int, max_questions: int,
                     remat: bool = True, instruct_len: int | None = None,
                     images_per_row: int = 1, segments_per_row: int = 1,
                     loss_chunks: int = 1) -> dict[str, float]:
  """FLOPs of one FUSION train step (forward + backward), by module.

  Args:
    cfg: the model.
    batch: rows per step (all devices together).
    seq_len: S, tokens per row (padding counted: it is computed).
    q: latent tokens per question.
    max_questions: question slots per row (Lq; P x Lq for packed rows).
    remat: decoder and tower layers are rematerialised (adds their forward to `hardware`).
    instruct_len: T, instruction tokens per image; default cfg.max_instruct_len.
    images_per_row: tower passes (5 crops each) per row; > 1 for packed rows.
    segments_per_row: packed rows: decoder attention within this many equal segments (the
      causal half of each segment's square: the model's work. cuDNN's packed layout on GPU
      computes only that; splash on TPU skips blocks by its static causal mask only, so it
      computes every causal block of the row and masks the other segments inside them).
    loss_chunks: > 1 adds the LM head's forward to the recompute (the chunked cross entropy
      projects each chunk again in the backward pass).

  Returns:
    {'fwd': {module: forward FLOPs}, 'model': 3 x forward (the MFU numerator), 'remat':
     recompute FLOPs, 'hardware': model + remat, 'fusion_share': share of `model` outside the
     LLM (tower, projectors, interaction), 'llm_6nd': 6 x LLM matmul params x tokens}.
    Module keys: llm, llm_attn, tower, projectors, interaction.
  """
  llm, vis = cfg.llm, cfg.vision
  t = cfg.max_instruct_len if instruct_len is None else instruct_len
  if not cfg.text_guidance:
    t = 0
  tokens = batch * seq_len
  d, dv, n = llm.hidden_size, vis.hidden_size, vis.num_patches

  dec = llm_train_flops(llm, batch=batch, seq_len=seq_len, remat=remat,
                        segments_per_row=segments_per_row)
  fwd: dict[str, float] = dict(dec["fwd"])

  images = batch * images_per_row
  vis_layer_w = 2.0 * (4 * dv * dv + 2 * dv * vis.intermediate_size)  # per token

  def tower_pass(m: int) -> float:  # one crop of m tokens, all layers; bidirectional attention
    return vis.num_layers * (m * vis_layer_w + 4.0 * m * m * dv)

  tower_layers = images * (4 * tower_pass(n) + tower_pass(n + t))
  patch = images * 5 * 2.0 * n * vis.patch_size**2 * 3 * dv  # conv as a matmul
  fwd["tower"] = tower_layers + patch

  mm = 2.0 * (3 * dv * d + d * d)  # per token
  aux = 2.0 * (d * dv + dv * dv)
  fwd["projectors"] = images * ((4 * n + n + t) * mm + (t + n) * aux)

  inter = 0.0
  if cfg.interaction and cfg.latents:
    slots = batch * max_questions * q
    win = images * q * cfg.window_size**2
    per_slot = 2.0 * (2 * d * d + d * d + d * d + 2 * d * d)  # proj_in, q, o, proj_out (2 Linears)
    per_win_token = 2.0 * 3 * d * d  # proj_context, k, v
    attn = 4.0 * slots * cfg.window_size**2 * d  # each slot: w*w keys, QK^T + PV
    inter = len(cfg.interaction_layers) * (slots * per_slot + win * per_win_token + attn)
  fwd["interaction"] = inter

  fwd_total = sum(fwd.values())
  model = 3.0 * fwd_total
  recompute = dec["remat"] + (tower_layers if remat else 0.0)
  if loss_chunks > 1:
    recompute += 2.0 * tokens * d * llm.vocab_size
  n_llm = llm.num_layers * llm_layer_flops(llm, 1) / 2.0 + d * llm.vocab_size
  fusion = 3.0 * (fwd["tower"] + fwd["projectors"] + fwd["interaction"])
  return {"fwd": fwd, "fwd_total": fwd_total, "model": model, "remat": recompute,
          "hardware": model + recompute, "fusion_share": fusion / model,
          "llm_6nd": 6.0 * n_llm * tokens}
