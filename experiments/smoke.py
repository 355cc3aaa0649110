r"""The main job: a tiny FUSION learns the synthesized QA data on a laptop CPU in minutes.

  python -m fusion_jax.run --config experiments/smoke.py --workdir runs/smoke

Synthesizes the default dataset into a cache folder (once), trains a sentencepiece tokenizer on
it, trains a tiny FUSION with every mechanism on (text-guided tower, global context, latents
with q drawn per batch, interaction layers, mapping loss), checkpoints, evaluates held-out
accuracy per category, exports the weights in the authors' PyTorch layout and prints a summary.

Args (`experiments/smoke.py:ARG`):
  (none)   the default run (targets: <= 10 min on 2 cores, SynthColor >= 0.9, every closed
           category >= 2x chance)
  short    a few steps on a small dataset (CI end-to-end test)
  random   the default run from random init with a tokenizer trained on the dataset (no base
           models; benchmarks/bases_vs_random.py compares the two)
  no_text_guidance | no_interaction | no_mapping_loss | no_latents
           the default run with one FUSION mechanism off (benchmarks/ablation.py runs them)
"""
import os

import ml_collections

from fusion_jax.train.config import base_config
from fusion_jax.task.fusion import VISION_TOWER_RULE, model_config

# Text categories need readable glyphs; at 32 px the synthesizer rejects every text item.
CATEGORIES = ("SynthColor", "SynthCount", "SynthSpatial", "SynthScene", "SynthMultiChoice",
              "SynthConvShort", "SynthConvLong", "SynthContrastShort", "SynthContrastLong",
              "SynthReasoning")
CONFIG_ARGS = ("", "short", "random", "no_text_guidance", "no_interaction", "no_mapping_loss", "no_latents")
# Paper recipe in miniature (docs/model.md §10): alignment data first, then everything (instruction
# data with the alignment data kept), each stage from the previous one's weights, fresh optimizer.
# Share of each category's records in the alignment stage: colour is learned from a few hundred
# samples, while the background pattern is read only after ~1 400 (a stage on SynthScene alone
# learned it between steps 150 and 200), so colour gives half of its records to the others. At a
# quarter, SynthColor came out 1.000 or 0.767 with gradients that differ by 1e-6 (the attention
# backward's arithmetic; docs/main_job.md, "Numerics"); at a half, 1.000 with both.
ALIGNMENT = {"SynthColor": 0.5, "SynthCount": 1.0, "SynthSpatial": 1.0, "SynthScene": 1.0}
# The shipped tiny base models (python -m fusion_jax.pretrain; assets/tiny_bases/README.md):
# the job imports them with import_hf, as a user starting from real base models does.
BASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny_bases")
ABLATIONS = {"no_text_guidance": "text_guidance", "no_interaction": "interaction",
             "no_mapping_loss": "mapping_loss", "no_latents": "latents"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg and arg not in ("short", "random") and arg not in ABLATIONS:
    raise ValueError(f"smoke.py:{arg}: choose '', 'short', 'random' or one of {sorted(ABLATIONS)}")
  short = arg == "short"
  c = base_config()
  c.task = "fusion"

  # Dataset (fusion_jax.synth), cached under cache_dir by its own parameters.
  c.synth = ml_collections.ConfigDict(dict(
      num=200 if short else 24000, seed=0, size=32, categories=CATEGORIES,
      heldout=0.1 if short else 0.025,
      cache_dir=".cache/smoke_data"))
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=400))
  # Base models (transformers dirs) imported into <workdir>/base_model; their tokenizer is the
  # job's. Empty llm = random init and a tokenizer trained on the dataset (tokenizer.vocab_size).
  c.base = ml_collections.ConfigDict(dict(
      llm="" if arg == "random" else os.path.normpath(os.path.join(BASES, "phi3")),
      vision="" if arg == "random" else os.path.normpath(os.path.join(BASES, "siglip")),
      preset="tiny"))

  # Model: the tiny preset as a small FUSION 3B (Phi-3 decoder, phi_3 template) ; vocab_size
  # and pad id come from the tokenizer. The shipped bases have these shapes (their SigLIP one
  # layer more: import_hf drops the last, as the authors do).
  c.model = model_config(
      "tiny",
      llm=dict(arch="phi3", hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
               num_kv_heads=4, head_dim=32, max_position_embeddings=1024),
      vision=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                  num_layers=4, num_heads=4),
      query_len=(1, 4), num_interaction=2, interaction_start=0, interaction_stride=2,
      interaction_heads=4, max_instruct_len=64, template="phi_3")
  if arg in ABLATIONS:
    c.model.overrides[ABLATIONS[arg]] = False

  # Data pipeline (paths, image_root and tokenizer are filled in by fusion_jax.run).
  c.data = ml_collections.ConfigDict(dict(
      paths=(), mixture="", image_root="", tokenizer="", num_examples=0, seq_len=192,
      max_questions=4, eval_q=4, seed=0, shuffle=True, worker_count=0, read_threads=2,
      prefetch=2, packing=False, max_samples_per_row=2))
  c.eval = ml_collections.ConfigDict(dict(split="heldout", batch_size=32))

  # (name, categories (() = all), fraction of num_steps[, {dotted config key: value}]):
  # fusion_jax/main_job/stages.py makes them fusion_jax.stages.Stage, as the paper configs'.
  # The alignment data is short: its stage trains at 128 tokens (a max length per stage, as
  # docs/model.md §10).
  c.stages = (("alignment", ALIGNMENT, 0.65, {"data.seq_len": 128}), ("instruction", (), 0.35))

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.compute_dtype = "float32"
  c.global_batch = 16
  c.num_steps = 6 if short else 1200
  c.optim.lr = 1e-3
  c.optim.warmup_frac = 0.05
  # The pretrained tower at lr / 10, as the paper's stages 1.5 and 2 (docs/model.md §10): at the
  # full lr its features decay over the job (benchmarks/main_job_diagnose.py).
  if arg != "random":
    c.optim.rules = ((VISION_TOWER_RULE, 0.1),)
  c.checkpoint.every = 3 if short else 200
  c.checkpoint.keep_last = 2
  c.checkpoint.async_save = True
  c.log_every = 1 if short else 25
  c.seed = 0
  return c
