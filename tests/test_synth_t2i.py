"""The diffusers text-to-image renderer: micro-batching, panels, and a tiny random pipeline."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from fusion_jax.synth import __main__ as cli
from fusion_jax.synth import scene as S
from fusion_jax.synth.openai_client import METER
from fusion_jax.synth.t2i_diffusers import GAP_GREY, MicroBatcher, side_by_side
from synth_fake_server import FakeChatServer


def _threads(fn, args) -> list:
  out = [None] * len(args)

  def run(k):
    try:
      out[k] = fn(args[k])
    except Exception as e:  # noqa: BLE001 - returned for the assertions
      out[k] = e
  ts = [threading.Thread(target=run, args=(k,)) for k in range(len(args))]
  [t.start() for t in ts]
  [t.join() for t in ts]
  return out


def test_micro_batcher_gathers_concurrent_calls():
  seen = []
  b = MicroBatcher(lambda items: seen.append(list(items)) or [x * 10 for x in items],
                   batch_size=3, max_wait_s=5.0)
  assert _threads(b.submit, list(range(6))) == [0, 10, 20, 30, 40, 50]
  assert sorted(len(s) for s in seen) == [3, 3] and b.calls == 2
  single = MicroBatcher(lambda items: [x + 1 for x in items], batch_size=4, max_wait_s=0.01)
  assert single.submit(1) == 2  # a lone call waits max_wait_s, then runs alone

  def boom(items):
    raise RuntimeError("out of memory")
  bad = MicroBatcher(boom, batch_size=2, max_wait_s=5.0)
  out = _threads(bad.submit, [1, 2])
  assert all(isinstance(e, RuntimeError) and "out of memory" in str(e) for e in out)


def test_side_by_side_letterboxes_two_panels():
  left = np.full((40, 40, 3), 10, np.uint8)
  right = np.full((40, 40, 3), 200, np.uint8)
  im = side_by_side(left, right, 50)
  assert im.shape == (50, 50, 3)
  assert im[25, 5, 0] == 10 and im[25, 45, 0] == 200 and im[25, 25, 0] == GAP_GREY
  assert im[0, 5, 0] == GAP_GREY  # letterbox above the square panels


def _tiny_pipeline(path: str) -> None:
  """A randomly initialised, tiny StableDiffusionPipeline saved to `path` (no downloads)."""
  import torch
  from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                         UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
  for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
    vocab[c], vocab[c + "</w>"] = 3 + i, 29 + i
  os.makedirs(path)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                      model_max_length=16)
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
      out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
      norm_num_groups=4, attention_head_dim=2)
  vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3,
                      down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                      norm_num_groups=4, sample_size=16)
  text = CLIPTextModel(CLIPTextConfig(
      bos_token_id=0, eos_token_id=1, hidden_size=16, intermediate_size=32,
      num_attention_heads=2, num_hidden_layers=1, vocab_size=len(vocab),
      max_position_embeddings=16, projection_dim=16))
  scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
  StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False).save_pretrained(path + "/pipe")


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
  pytest.importorskip("diffusers", reason="optional: pip install -r requirements-synth.txt")
  path = str(tmp_path_factory.mktemp("t2i") / "tiny")
  _tiny_pipeline(path)
  return path + "/pipe"


def _renderer(path: str, **kw):
  from fusion_jax.synth.t2i_diffusers import DiffusersRenderer
  args = dict(dtype="float32", device="cpu", steps=2, guidance=1.0, resolution=32)
  return DiffusersRenderer(path, **{**args, **kw})


def test_diffusers_renderer_batches_and_is_reproducible(tiny_pipe):
  descs = [S.Description("SynthColor", "a red ball"), S.Description("SynthColor", "a blue cup")]
  batched = _renderer(tiny_pipe, batch_size=2, max_wait_s=5.0)
  imgs = _threads(lambda d: batched.render(d, 24, np.random.default_rng(7)), descs)
  assert batched.batcher.calls == 1
  alone = _renderer(tiny_pipe, batch_size=1)
  ref = [alone.render(d, 24, np.random.default_rng(7)) for d in descs]
  for im, r in zip(imgs, ref):
    assert im.shape == (24, 24, 3) and im.dtype == np.uint8 and im.std() > 0
    # The item's own seed decides its noise: the batch partner changes nothing.
    assert np.abs(im.astype(int) - r.astype(int)).max() <= 1
  other_seed = alone.render(descs[0], 24, np.random.default_rng(8))
  assert np.abs(other_seed.astype(int) - ref[0].astype(int)).max() > 8
  pair = S.Description("SynthContrastShort", "Left image: a red ball Right image: a red cup",
                       focus={"panel_prompts": ["a red ball", "a red cup"]})
  im = alone.render(pair, 40, np.random.default_rng(7))
  assert im.shape == (40, 40, 3) and im[20, 20, 0] == GAP_GREY


def test_diffusers_renderer_errors_name_the_fix(tmp_path):
  pytest.importorskip("diffusers", reason="optional: pip install -r requirements-synth.txt")
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    _renderer(str(tmp_path))


def test_cli_with_llm_server_and_diffusers_pipeline(tiny_pipe, tmp_path):
  server = FakeChatServer()
  METER.reset()
  try:
    out = str(tmp_path / "out")
    cli.main(["--out", out, "--num", "2", "--size", "32", "--categories", "SynthColor",
              "--llm-url", server.url, "--llm-model", "llm", "--t2i-pipeline", tiny_pipe,
              "--t2i-dtype", "float32", "--t2i-device", "cpu", "--t2i-steps", "2",
              "--t2i-guidance", "1.0", "--t2i-batch", "2", "--quiet"])
  finally:
    server.close()
    METER.reset()
  stats = json.load(open(os.path.join(out, "stats.json")))
  assert stats["complete"] and stats["records"] == 2
  assert stats["config"]["backends"]["renderer"]["kwargs"]["pipeline"] == tiny_pipe
  assert len(os.listdir(os.path.join(out, "images"))) >= 2
