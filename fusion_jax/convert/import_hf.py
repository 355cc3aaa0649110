"""Start a stage-1 FUSION model from a base LLM and a SigLIP tower (transformers directories).

  python -m fusion_jax.convert.import_hf --llm DIR --vision DIR --preset NAME --out DIR [--seed 0]

What the authors' training does at the start of stage 1 (fusion/train/train.py and
fusion/model/fusion_arch.py in starriver030515/FUSION-Code), and what this reproduces:
  * LLM: the base checkpoint (LlamaForCausalLM / Phi3ForCausalLM).
  * Vocabulary: `initialize_vision_tokenizer` adds `<vision_start>` and `<vision_end>` to the
    tokenizer, `resize_token_embeddings(len(tokenizer))`, then sets the last 2 rows of the
    input AND output embeddings to the mean of all rows before them. So the new vocabulary is
    len(tokenizer) + 2 (not rows + 2: Phi-3.5 stores 32064 rows for a 32011-token tokenizer and
    ends at 32013), and the mean runs over the first len(tokenizer) rows. Without a tokenizer
    in the LLM dir the stored row count stands in for len(tokenizer).
  * Tower: the first L-1 layers of the SigLIP checkpoint (SigLipVisionTower.load_model deletes
    the last), plus embeddings and post_layernorm.
  * New modules (mm_projector, aux_projector, interaction layers): random init, here with the
    Fusion modules' own initialisers (torch Linear's default distribution).
  * FUSION fields (interaction schedule, query lengths, window, template, switches, dtypes)
    come from the preset; LLM and tower shapes from the checkpoints.
The LLM's tokenizer files are copied to OUT/tokenizer/; fusion_jax.data.tokenizer appends the
two vision tokens on load with exactly the ids given here (len(tokenizer), len(tokenizer) + 1),
which this command checks.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fusion_jax import cli
from fusion_jax.convert import fusion_torch
from fusion_jax.convert.hf import hf_architecture, load_hf_dir, read_config
from fusion_jax.convert.hf_siglip import (siglip_config_from_hf, siglip_params_from_reader,
                                          siglip_prefix)
from fusion_jax.convert.import_torch import copy_tokenizer
from fusion_jax.convert.model_dir import TOKENIZER_NAME, save_model_dir
from fusion_jax.convert.safetensors_io import SafetensorsReader
from fusion_jax.models.connector import AuxProjector, MMProjector
from fusion_jax.models.fusion import FusionConfig
from fusion_jax.models.interaction import InteractionLayer
from fusion_jax.models.presets import get_preset
from fusion_jax.models.vision import VisionConfig, fusion_tower

NUM_NEW_TOKENS = 2  # <vision_start>, <vision_end>
_TEMPLATE_OF_ARCH = {"phi3": "phi_3", "llama": "llama_3"}


def tokenizer_length(llm_dir: str) -> tuple[int, int | None] | None:
  """(len(tokenizer) before the vision tokens, pad id) of the LLM dir's tokenizer; None if the
  dir has none. Raises if the tokenizer already holds the vision tokens (the authors' add_tokens
  would then add nothing; such a base model is not a stage-1 start)."""
  from fusion_jax.data.tokenizer import VISION_END, VISION_START, load_tokenizer
  if not any(os.path.isfile(os.path.join(llm_dir, n))
             for n in ("tokenizer.json", "tokenizer.model")):
    return None
  for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
    path = os.path.join(llm_dir, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        text = f.read()
      if VISION_START in text or VISION_END in text:
        raise ValueError(f"{path} already defines {VISION_START}/{VISION_END}: this is not a base "
                         "LLM tokenizer; point --llm at the base model")
  tok = load_tokenizer(llm_dir)  # appends the two vision tokens itself
  return tok.vocab_size - NUM_NEW_TOKENS, tok.pad_id


def grow_vocab(table: np.ndarray, n_old: int, where: str) -> np.ndarray:
  """(rows, D) -> (n_old + 2, D): rows[:n_old] kept, the 2 new rows = their mean (float64 sum).

  Matches initialize_vision_tokenizer: resize to len(tokenizer) (truncating extra rows), then
  rows[-2:] = rows[:-2].mean(0).
  """
  if table.shape[0] < n_old:
    raise ValueError(f"{where}: {table.shape[0]} rows but the tokenizer has {n_old} tokens; the "
                     "tokenizer does not belong to this LLM")
  old = table[:n_old]
  mean = old.mean(axis=0, dtype=np.float64).astype(table.dtype)
  return np.concatenate([old, np.broadcast_to(mean, (NUM_NEW_TOKENS, table.shape[1]))], axis=0)


def init_new_modules(cfg: FusionConfig, seed: int) -> dict[str, Any]:
  """Random mm_projector, aux_projector and interaction_{j} params (numpy), on the host CPU.

  Each module is initialised on its own with inputs of the right widths, so nothing of the
  LLM or tower is allocated.
  """
  d, dv = cfg.llm.hidden_size, cfg.vision.hidden_size
  kw = dict(dtype=jnp.dtype(cfg.llm.dtype), param_dtype=jnp.dtype(cfg.llm.param_dtype))
  w = cfg.window_size
  n = len(cfg.interaction_layers)
  keys = jax.random.split(jax.random.key(seed), 2 + n)
  modules = {
      "mm_projector": (MMProjector(d, **kw), (jnp.zeros((1, 1, 3 * dv)),), keys[0]),
      "aux_projector": (AuxProjector(dv, **kw), (jnp.zeros((1, 1, d)),), keys[1]),
  }
  for j in range(n):
    modules[f"interaction_{j}"] = (
        InteractionLayer(cfg.interaction_heads, **kw),
        (jnp.zeros((1, 1, d)), jnp.zeros((1, 1, 1, d)), jnp.zeros((1, 1, w * w, d))), keys[2 + j])
  out = {}
  with jax.default_device(jax.devices("cpu")[0]):
    for name, (module, inputs, key) in modules.items():
      variables = jax.jit(module.init)(key, *inputs)
      out[name] = jax.tree.map(np.asarray, fusion_torch.unbox(variables))
  return out


def import_hf(llm_dir: str, vision_dir: str, preset: str, out_dir: str, *, seed: int = 0,
              template: str | None = None, log=print) -> FusionConfig:
  """Builds and saves the stage-1 start model; returns its FusionConfig.

  template: the chat template the model dir records (default: the preset's).
  """
  if template and template not in _TEMPLATE_OF_ARCH.values():
    raise ValueError(f"--template {template!r}: use one of {sorted(_TEMPLATE_OF_ARCH.values())}")
  base = get_preset(preset, **({"template": template} if template else {}))
  # --- LLM
  llm_cfg_json = read_config(llm_dir)
  kind, llm_cfg, llm = load_hf_dir(llm_dir, weights_dtype=np.float32)
  if kind != "llm":
    raise ValueError(f"--llm {llm_dir}: a {kind} checkpoint, expected LlamaForCausalLM or "
                     "Phi3ForCausalLM")
  rows = llm["embed_tokens"]["embedding"].shape[0]
  tok = tokenizer_length(llm_dir)
  if tok is None:
    n_old, pad = rows, None
    log(f"no tokenizer in {llm_dir}: the {rows} stored embedding rows stand in for "
        "len(tokenizer) (the authors resize to len(tokenizer) + 2; Phi-3.5 stores more rows "
        "than its tokenizer has, so put the tokenizer files there for a faithful start)")
  else:
    n_old, pad = tok
    if n_old != rows:
      log(f"tokenizer has {n_old} tokens, the embedding {rows} rows: resized to {n_old} + 2 as "
          "the authors' resize_token_embeddings(len(tokenizer)) does")
  vocab = n_old + NUM_NEW_TOKENS
  llm["embed_tokens"]["embedding"] = grow_vocab(llm["embed_tokens"]["embedding"], n_old,
                                                f"{llm_dir} embed_tokens")
  if not llm_cfg.tie_word_embeddings:
    # Flax lm_head kernel is (D, V): grow along V.
    llm["lm_head"]["kernel"] = np.ascontiguousarray(
        grow_vocab(llm["lm_head"]["kernel"].T, n_old, f"{llm_dir} lm_head").T)
  # FUSION's pad is the preset's (train.py: Phi `<unk>` 0, Llama-3 128002), whatever the base
  # config or tokenizer_config say (Phi-3.5's names <|endoftext|>); tiny vocabularies fall back.
  if base.llm.pad_token_id < vocab:
    pad = base.llm.pad_token_id
  elif pad is None:
    pad = llm_cfg.pad_token_id
  llm_cfg = llm_cfg.replace(
      vocab_size=vocab, pad_token_id=int(pad),
      **{k: getattr(base.llm, k) for k in ("dtype", "param_dtype", "remat_policy", "scan_layers")})

  # --- tower: first L-1 layers
  vis_json = read_config(vision_dir)
  arch = hf_architecture(vis_json, os.path.join(vision_dir, "config.json"))
  if not arch.startswith("Siglip"):
    raise ValueError(f"--vision {vision_dir}: {arch} is not a SigLIP tower (SiglipVisionModel "
                     "or SiglipModel expected)")
  full: VisionConfig = siglip_config_from_hf(vis_json)
  if full.num_layers < 2:
    raise ValueError(f"--vision {vision_dir}: {full.num_layers} layer(s); FUSION drops the last "
                     "one and needs at least one left")
  vision_cfg = dataclasses.replace(
      fusion_tower(full),
      **{k: getattr(base.vision, k) for k in ("dtype", "param_dtype", "remat_policy")})
  reader = SafetensorsReader(vision_dir)
  tower = siglip_params_from_reader(reader, siglip_prefix(reader), vision_cfg.num_layers,
                                    config=vision_cfg, dtype=np.float32)

  if _TEMPLATE_OF_ARCH[llm_cfg.arch] != base.template:
    source = "--template" if template else f"preset {preset!r}"
    log(f"WARNING: {source} gives template {base.template!r} but the LLM is {llm_cfg.arch} "
        f"(authors: {_TEMPLATE_OF_ARCH[llm_cfg.arch]!r}); keeping it (--template picks one)")
  cfg = base.replace(llm=llm_cfg, vision=vision_cfg)
  params = {"llm": llm, "vision_tower": tower, **init_new_modules(cfg, seed)}
  fusion_torch.check_param_shapes(params, cfg)
  meta = {"converted_by": "fusion_jax.convert.import_hf", "llm_source": os.path.abspath(llm_dir),
          "vision_source": os.path.abspath(vision_dir), "preset": preset, "seed": seed,
          "llm_config": llm_cfg_json, "tower_config": vis_json,
          "vision_token_ids": [n_old, n_old + 1]}
  save_model_dir(out_dir, params, cfg, extra_meta=meta)
  copied = copy_tokenizer(llm_dir, os.path.join(out_dir, TOKENIZER_NAME))
  if copied:
    from fusion_jax.data.tokenizer import load_tokenizer
    t = load_tokenizer(os.path.join(out_dir, TOKENIZER_NAME))
    if (t.vision_start_id, t.vision_end_id, t.vocab_size) != (n_old, n_old + 1, vocab):
      raise ValueError(f"tokenizer copied to {out_dir}/{TOKENIZER_NAME} gives vision ids "
                       f"{t.vision_start_id}, {t.vision_end_id} and {t.vocab_size} tokens; the "
                       f"embedding expects {n_old}, {n_old + 1} and {vocab}")
    log(f"tokenizer files copied to {out_dir}/{TOKENIZER_NAME}: {copied} (vision tokens get ids "
        f"{n_old}, {n_old + 1} on load)")
  else:
    log(f"no tokenizer files in {llm_dir}; add the LLM's tokenizer to {out_dir}/{TOKENIZER_NAME}")
  log(f"model: {fusion_torch.describe(cfg)}")
  log(f"compute dtype: LLM {cfg.llm.dtype}, tower {cfg.vision.dtype} (parameters stored in "
      "float32); infer / eval / serve --dtype overrides it at load time")
  log(f"parameters: {fusion_torch.param_count(params):,}; new rows {n_old}, {n_old + 1} = mean of "
      f"rows 0..{n_old - 1}; tower layers 0..{vision_cfg.num_layers - 1} of {full.num_layers}")
  log(f"wrote {out_dir}")
  return cfg


PROG = "python -m fusion_jax.convert.import_hf"


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli)."""
  flags.DEFINE_string("llm", None, "LlamaForCausalLM / Phi3ForCausalLM directory",
                      flag_values=fv, required=True)
  flags.DEFINE_string("vision", None, "SiglipVisionModel / SiglipModel directory",
                      flag_values=fv, required=True)
  flags.DEFINE_string("preset", None, "FUSION preset for the FUSION fields (fusion_3b, "
                      "fusion_x_8b, tiny, ...)", flag_values=fv, required=True)
  flags.DEFINE_string("out", None, "new fusion_jax model dir", flag_values=fv, required=True)
  flags.DEFINE_integer("seed", 0, "seed of the new modules' random init", flag_values=fv)
  flags.DEFINE_string("template", None, "chat template the model dir records (default: the "
                      "preset's; phi_3 for Phi-3, llama_3 for Llama 3 as the authors)",
                      flag_values=fv)


def _run(args) -> int:
  try:
    import_hf(args.llm, args.vision, args.preset, args.out, seed=args.seed,
              template=args.template)
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
    print(f"import_hf: error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(cli.parse(define_flags, argv, PROG))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG)
