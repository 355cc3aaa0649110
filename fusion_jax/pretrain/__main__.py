r"""Builds the tiny base models the main job imports (assets/tiny_bases/).

  python -m fusion_jax.pretrain --out assets/tiny_bases [--config experiments/smoke.py]

Shapes come from the experiment config's model: the tower gets one layer more than the
config's FUSION tower (import_hf drops the last SigLIP layer, as the authors do), the LM is
the config's LLM with the shipped tokenizer's vocabulary. Writes OUT/siglip/ (SiglipVisionModel),
OUT/phi3/ (Phi3ForCausalLM + tokenizer), OUT/pretrain_log.json (losses, timings, settings).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
import types
from collections.abc import Sequence

import numpy as np
from absl import flags

from fusion_jax import cli


def load_experiment(path: str, arg: str = ""):
  """(module, get_config(arg)) of the experiment config file at `path`."""
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod, mod.get_config(arg)


PROG = "python -m fusion_jax.pretrain"
CAPTION_LEN = 64


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli)."""
  flags.DEFINE_string("out", None, "output directory (assets/tiny_bases)", flag_values=fv,
                      required=True)
  flags.DEFINE_string("config", "experiments/smoke.py", "experiment config whose model the "
                      "bases fit", flag_values=fv)
  flags.DEFINE_integer("num", 32000, "synthesized scenes", flag_values=fv)
  flags.DEFINE_integer("vocab_size", 400, "tokenizer pieces", flag_values=fv)
  flags.DEFINE_integer("tower_steps", 1200, "tower training steps", flag_values=fv)
  flags.DEFINE_integer("tower_batch", 256, "tower batch size", flag_values=fv)
  flags.DEFINE_float("tower_lr", 1e-3, "tower peak learning rate", flag_values=fv)
  flags.DEFINE_float("dense_weight", 1.0, "weight of the tower's dense term (what covers each "
                     "patch, the background pattern); 0 = sigmoid terms only", flag_values=fv)
  flags.DEFINE_integer("lm_steps", 300, "LM training steps", flag_values=fv)
  flags.DEFINE_integer("lm_batch", 16, "LM batch size", flag_values=fv)
  flags.DEFINE_integer("lm_seq_len", 128, "LM sequence length", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return build(cli.parse(define_flags, argv, PROG), argv)


def build(args: types.SimpleNamespace, argv: Sequence[str] | None = None) -> int:
  """Builds the base models into args.out; argv (default sys.argv[1:]) is logged as the
  command."""
  import jax
  from fusion_jax.pretrain import lm, pairs, tower
  from fusion_jax.task.fusion import fusion_config_from

  def log(msg: str) -> None:
    print(f"[fusion_jax.pretrain] {msg}", flush=True)

  t_all = time.time()
  mod, config = load_experiment(args.config)
  fcfg = fusion_config_from(config.model)
  if int(config.synth.seed) == pairs.PRETRAIN_SEED:
    raise ValueError(f"{args.config}: synth.seed equals PRETRAIN_SEED; the data would overlap")
  vision = dataclasses.replace(fcfg.vision, num_layers=fcfg.vision.num_layers + 1,
                               dtype="float32")
  categories = tuple(config.synth.categories)
  times = {}

  t = time.time()
  items = pairs.build_items(args.num, categories, int(config.synth.size))
  times["synthesize"] = time.time() - t
  log(f"{len(items)} scenes (seed {pairs.PRETRAIN_SEED}, {config.synth.size} px) in "
      f"{times['synthesize']:.0f} s")

  llm_dir = os.path.join(args.out, "phi3")
  os.makedirs(llm_dir, exist_ok=True)
  t = time.time()
  tok = lm.train_tokenizer(items, llm_dir, args.vocab_size)
  times["tokenizer"] = time.time() - t
  n_base = tok.vocab_size - 2  # load_tokenizer appended <vision_start>, <vision_end>
  log(f"tokenizer: {n_base} tokens (+2 vision tokens on load) in {llm_dir}")

  # --- tower (the last HOLD scenes are kept out of its training, for the log's accuracies)
  images = np.stack([it.image for it in items])
  caps = [it.caption for it in items]
  # Cut at CAPTION_LEN: the facts carry the details; a longer text side costs more than the
  # tower on 2 CPU cores.
  t_len = min(CAPTION_LEN, max(len(tok.encode(c)) for c in caps))
  cap_ids, cap_mask = lm.pack_ids(caps, tok, t_len, tok.pad_id)
  hold = min(256, len(items) // 4)
  train, test = slice(0, len(items) - hold), slice(len(items) - hold, len(items))
  facts = tower.qa_facts(items[train], tok.encode, tok.pad_id)
  t = time.time()
  dense = tower.patch_labels(items, vision.patch_size)
  dual, tower_losses = tower.train_tower(vision, images[train], cap_ids[train], cap_mask[train],
                                         facts, tok.vocab_size, dense=dense[train],
                                         dense_weight=args.dense_weight, steps=args.tower_steps,
                                         batch=args.tower_batch, lr=args.tower_lr, log=log)
  times["tower"] = time.time() - t
  acc = tower.retrieval_accuracy(vision, dual, images[test], cap_ids[test], cap_mask[test],
                                 tok.vocab_size)
  fact_acc = tower.fact_accuracy(vision, dual, images[test],
                                 tower.qa_facts(items[test], tok.encode, tok.pad_id),
                                 tok.vocab_size)
  dense_acc = tower.dense_accuracy(vision, dual, images[test], dense[test], tok.vocab_size)
  log(f"tower on {hold} unseen scenes: image->caption top-1 {acc:.3f}, right QA candidate "
      f"{fact_acc:.3f}, dense shape / colour / pattern {' / '.join(f'{a:.3f}' for a in dense_acc)}")
  tower.save_siglip(os.path.join(args.out, "siglip"), vision, dual["tower"])

  # --- LM
  llm_cfg = fcfg.llm.replace(vocab_size=n_base, pad_token_id=tok.pad_id, dtype="float32",
                             scan_layers=False, remat_policy="none")
  texts = lm.chat_texts(items, fcfg.template)
  lens = np.array([len(tok.encode(s)) for s in texts])
  ids, mask = lm.pack_ids(texts, tok, args.lm_seq_len, tok.pad_id)
  log(f"lm: {len(texts)} texts, tokens median {int(np.median(lens))}, max {lens.max()}, "
      f"{np.mean(lens > args.lm_seq_len):.1%} cut at {args.lm_seq_len}")
  t = time.time()
  lm_params, lm_losses = lm.train_lm(llm_cfg, ids, mask, steps=args.lm_steps,
                                     batch=args.lm_batch, log=log)
  times["lm"] = time.time() - t
  lm.save_phi3(llm_dir, llm_cfg, lm_params)
  times["total"] = time.time() - t_all

  with open(os.path.join(args.out, "pretrain_log.json"), "w") as f:
    command = " ".join(sys.argv[1:] if argv is None else argv)
    json.dump({"command": "python -m fusion_jax.pretrain " + command,
               "args": vars(args), "pretrain_seed": pairs.PRETRAIN_SEED,
               "main_job_seed": int(config.synth.seed), "num_items": len(items),
               "jax": jax.__version__, "devices": str(jax.devices()),
               "time_s": times, "tower_heldout_scenes": hold,
               "tower_retrieval_top1": acc, "tower_fact_accuracy": fact_acc,
               "tower_dense_accuracy": dict(zip(("shape", "colour", "pattern"),
                                                map(float, dense_acc))),
               "tower_loss": tower_losses[::10] + tower_losses[-1:],
               "lm_loss": lm_losses[::10] + lm_losses[-1:]}, f, indent=1)
  log(f"wrote {args.out} in {times['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, build, PROG)
