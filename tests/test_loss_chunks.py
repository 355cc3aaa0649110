"""The training loss projects the decoder's hidden states itself (fusion.lm_head): in
config.loss_chunks token chunks, with the LM head's width padded to a multiple of 128 on GPU and
TPU. The loss and gradients equal those of the model's own (B, S, V) logits: the trainer's route
with an untied LM head (traced as for a GPU, so that it pads), fusion.loss_fn (the benchmarks'
route) with a tied one; an odd vocabulary, so that the padding is exercised."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from fusion_jax.models import attention_kernels, batch_spec, fusion, lm_head, mapping_loss
from fusion_jax.task.fusion import FusionTask
from fusion_jax.train.config import base_config

VOCAB = 250  # padded to 256 by the loss


def _task(chunks: int, tied: bool) -> FusionTask:
  c = base_config()
  c.task = "fusion"
  c.model = ml_collections.ConfigDict(dict(preset="tiny", overrides=ml_collections.ConfigDict(
      dict(llm=dict(tie_word_embeddings=tied, vocab_size=VOCAB)))))
  c.compute_dtype = "float32"
  c.global_batch = 2
  c.loss_chunks = chunks
  return FusionTask(c)


def _logits_loss(params, batch, cfg):
  """The reference: the model's (B, S, V) logits into the FUSION loss."""
  logits, out = fusion.apply(params, batch, cfg, train=True)
  assert logits.shape[-1] == VOCAB
  loss, _ = mapping_loss.fusion_loss(
      logits, batch["labels"], out["instruct_embeds"], out["instruct_feats"],
      batch["instructs_mask"], out["patch_embeds"], out["projected_back"],
      sample_mask=fusion.vision_map_samples(batch, cfg), mapping_weight=cfg.mapping_weight)
  return loss


def test_the_head_is_padded_on_accelerators_only():
  assert lm_head.loss_vocab_pad("cpu") == 1
  assert lm_head.loss_vocab_pad("gpu") == lm_head.loss_vocab_pad("tpu") == lm_head.LOSS_VOCAB_PAD == 128
  with attention_kernels.target_backend("tpu"):  # an AOT compile for a TPU slice
    assert lm_head.loss_vocab_pad() == 128


@pytest.mark.parametrize("tied", [False, True])
def test_projected_loss_equals_the_logits_loss(tied, monkeypatch):
  """Untied: the trainer's route, 4 chunks, padded as on a GPU. Tied: fusion.loss_fn, one chunk,
  padded explicitly. (Chunks and padding alone: tests/test_cross_entropy.py.)"""
  task = _task(1 if tied else 4, tied)
  cfg = task.cfg
  assert cfg.llm.tie_word_embeddings == tied and cfg.llm.vocab_size == VOCAB
  exs = fusion.example_samples(cfg, 5, seq_len=32, max_questions=2, q=4, seed=1)
  batch = batch_spec.pack_examples([exs[:2], exs[2:]], seq_len=96, samples_per_row=3, pad_id=0)
  init_batch = fusion.example_batch(cfg, batch_size=1, seq_len=8, max_questions=1, q=1, seed=None)
  params = nn.meta.unbox(fusion.init(jax.random.key(0), cfg, init_batch)["params"])
  assert ("lm_head" in params["llm"]) != tied

  def trainer(p):
    sums, _ = task.loss_fn(p, batch, None)
    dens = task.loss_denominators(batch)
    return sum(w * sums[k] / dens[k] for k, w in task.loss_weights.items())

  def model(p):
    return fusion.loss_fn(p, batch, cfg, vocab_pad=128)[0]

  want, g_want = jax.jit(jax.value_and_grad(lambda p: _logits_loss(p, batch, cfg)))(params)
  if not tied:  # the trainer pads as it would on a GPU
    monkeypatch.setattr(attention_kernels, "traced_backend", lambda: "gpu")
    assert fusion.lm_head(params, cfg).pad_to == 128
  got, g_got = jax.jit(jax.value_and_grad(model if tied else trainer))(params)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(g_want):
    b = g_got
    for k in path:
      b = b[k.key]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_chunks_that_do_not_divide_the_row_name_the_setting():
  with pytest.raises(ValueError, match="loss_chunks=5 must divide data.seq_len 64"):
    c = _task(1, False).config
    c.data.seq_len, c.loss_chunks = 64, 5
    FusionTask(c)
  task = _task(5, False)  # no data.seq_len: the rows' length is checked when traced
  cfg = task.cfg
  batch = batch_spec.stack_examples(
      fusion.example_samples(cfg, 2, seq_len=32, max_questions=2, q=4, seed=1))
  params = jax.eval_shape(lambda: nn.meta.unbox(fusion.init(jax.random.key(0), cfg, batch)))
  with pytest.raises(ValueError, match="--config.loss_chunks"):  # when the step is traced
    jax.eval_shape(lambda p: task.loss_fn(p, batch, None), params["params"])
