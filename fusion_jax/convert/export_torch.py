"""Export a fusion_jax model dir as a checkpoint the authors' PyTorch code loads.

  python -m fusion_jax.convert.export_torch CKPT_DIR OUT_DIR [--dtype float32|bfloat16]
      [--shard-size 5GB] [--model-max-length 4096] [--allow_incompatible]

A model the authors' code cannot run (their code hard-codes 729 / 576 tower patches, the tower
depth its feature connector splits, 16 interaction heads) is refused with every mismatch listed,
unless --allow_incompatible (then README.md says it is not runnable there).

OUT_DIR receives:
  config.json                      fusion_phi / fusion_llama config (transformers 4.48 style)
  model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                   every tensor under the authors' key names and shapes
  siglip_vision_tower/ (or siglip2_vision_tower/)
                                   the tower's own config.json (num_hidden_layers = stored + 1)
                                   and its weights (keys vision_model.*, the stored layers):
                                   the authors' SigLipVisionTower.load_model runs
                                   SigLipVisionModel.from_pretrained(mm_vision_tower), which
                                   random-inits the missing last layer and then deletes it
  tokenizer files                  copied from CKPT_DIR/tokenizer/ when present
  README.md                        how to load it

config.json's mm_vision_tower names that subfolder relatively; the authors' builder picks the
tower class from the name ('siglip2' / 'siglip' must occur in it) and from_pretrained resolves
it against the working directory, so run their loader from inside OUT_DIR or rewrite the
entry to an absolute path (README.md says so). Tensors are converted and written one at a time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Sequence

from absl import flags

from fusion_jax import cli
from fusion_jax.convert import fusion_torch, fusion_torch_config
from fusion_jax.convert.hf_siglip import siglip_tensors_to_torch
from fusion_jax.convert.import_torch import DTYPES, np_dtype
from fusion_jax.convert.model_dir import TOKENIZER_NAME
from fusion_jax.convert.safetensors_io import write_safetensors
from fusion_jax.models.fusion import FusionConfig

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '2GiB' / '123' -> bytes (decimal units as transformers' max_shard_size)."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"--shard-size {text!r}: expected a number with an optional unit "
                     f"({', '.join(u for u in _UNITS if u)})")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# What the authors' code hard-codes, per tower class (chosen by fusion_torch.tower_dir_name):
# the patch count (SigLipVisionEmbeddings asserts 729 and the text-guided masks use 729;
# SigLIP2 576) and the stored depth its feature connector splits (hidden states 0-12 | 13-25 and
# early attention in layers < 13 for SigLIP; 0-18 | 19-37 and < 19 for SigLIP2).
AUTHORS_TOWERS = {"siglip_vision_tower": ("SigLipVisionTower", 729, 26),
                  "siglip2_vision_tower": ("SigLip2VisionTower", 576, 39)}
# The interaction layers' attention heads (their vision sampler hard-codes 16).
AUTHORS_INTERACTION_HEADS = 16


def authors_code_problems(cfg: FusionConfig) -> list[str]:
  """Every reason the authors' PyTorch code could not run `cfg` ([] when it can).

  Their code loads such a checkpoint strictly (the tensors are exact) and then fails in, or
  silently changes, its forward pass.
  """
  v = cfg.vision
  cls, patches, depth = AUTHORS_TOWERS[fusion_torch.tower_dir_name(v)]
  problems = []
  if v.num_patches != patches:
    problems.append(f"the tower has {v.num_patches} patches ({v.image_size} px / patch "
                    f"{v.patch_size}) but their {cls} hard-codes {patches}")
  if v.num_layers != depth:
    problems.append(f"the tower stores {v.num_layers} layers but their {cls}'s feature "
                    f"connector and early-layer masks expect {depth} (k = {depth // 2})")
  if cfg.interaction_layers and cfg.interaction_heads != AUTHORS_INTERACTION_HEADS:
    problems.append(f"the interaction layers have {cfg.interaction_heads} heads but their code "
                    f"hard-codes {AUTHORS_INTERACTION_HEADS} (it would run silently with "
                    f"{AUTHORS_INTERACTION_HEADS})")
  return problems


def torch_dir_name(cfg: FusionConfig) -> str:
  """A folder name the authors' loader routes correctly: 'torch_fusion_phi' / '..._llama'."""
  return "torch_" + fusion_torch_config.model_type_of(cfg)


def loader_name_problems(out_dir: str, cfg: FusionConfig) -> list[str]:
  """Why the authors' load_pretrained_model would misroute OUT_DIR (fusion/model/builder.py).

  It takes the model name from the path's last component and, lower-cased: requires 'fusion';
  then tests 'mpt', 'qwen', 'phi', 'mistral' in that order (Phi class on 'phi', Llama class
  when none matches); 'lora' without a base model only warns.
  """
  name = os.path.basename(os.path.normpath(out_dir)).lower()
  problems = []
  if "fusion" not in name:
    problems.append("it lacks 'fusion' (the loader would not build a FUSION model)")
  for other in ("mpt", "qwen"):
    if other in name:
      problems.append(f"it contains {other!r} (the loader would pick its {other} class)")
  if cfg.llm.arch == "phi3" and "phi" not in name:
    problems.append("it lacks 'phi' (the loader would build the Llama class for a Phi model)")
  if cfg.llm.arch == "llama" and ("phi" in name or "mistral" in name):
    problems.append("it contains 'phi'/'mistral' (the loader would pick the wrong class for a "
                    "Llama model)")
  return problems


README = """# FUSION checkpoint exported by fusion_jax

Model: {description}
Exported from: {source}

This directory is a transformers `save_pretrained` layout of `{architecture}` (model_type
`{model_type}`) as written by the FUSION authors' code, with tensors in {dtype}.

Loading with the authors' code (starriver030515/FUSION, `fusion.model.builder`):

    cd {out_dir}
    python -c "from fusion.model.builder import load_pretrained_model; \\
      load_pretrained_model('{out_dir}', None, '{name}')"

* `config.json` has `"mm_vision_tower": "{tower}"`, a path RELATIVE to the working directory
  (the authors' tower loader calls `from_pretrained(mm_vision_tower)` as is). Either run from
  inside this directory, or rewrite that entry to the absolute path `{out_dir}/{tower}`. Keep
  '{tower_word}' in the folder name: the authors' builder picks the tower class from it.
* `{tower}/` holds the tower's config (num_hidden_layers = {full_layers}, the layer count
  before FUSION drops the last one) and the {stored_layers} stored layers; the missing last
  layer is randomly initialised by `from_pretrained` and then deleted by the authors' code.
* The authors' loader takes the model name from the directory name: it must contain 'fusion'
  {phi_rule}.
{incompatible}"""

INCOMPATIBLE = """
**The authors' code cannot run this model** (exported with --allow_incompatible): {problems}.
It loads (names and shapes are exact) but its forward pass fails or differs. Use the weights with
fusion_jax (`python -m fusion_jax.convert.import_torch` reads this directory back exactly).
"""


def _load_source(ckpt_dir: str, step: int | None = None):
  """(params, FusionConfig, meta, tokenizer dir or None) of a model dir or a training run
  (newest checkpoint, or `step`), read by the one model loader (fusion_jax/infer/load.py)."""
  from fusion_jax.infer.load import load_model, tokenizer_dir
  model = load_model(ckpt_dir, step=step)
  return model.params, model.cfg, dict(model.meta), tokenizer_dir(model)


class IncompatibleModelError(ValueError):
  """The model cannot run in the authors' code (see authors_code_problems)."""


def export_torch(ckpt_dir: str, out_dir: str, *, dtype: str = "float32",
                 shard_size: str = "5GB", model_max_length: int = 4096,
                 step: int | None = None, allow_incompatible: bool = False,
                 log=print) -> list[str]:
  """Writes OUT_DIR from CKPT_DIR: a model dir, or a training workdir (newest checkpoint).

  Raises IncompatibleModelError, listing every mismatch, when the authors' code could not run
  the model (authors_code_problems), unless allow_incompatible: then it exports anyway, says
  so in the log and README.md, and returns the problems ([] for a compatible model).
  """
  max_bytes = parse_size(shard_size)
  leaf_dtype = np_dtype(dtype)
  if os.path.isdir(out_dir) and any(n.endswith(".safetensors") or n == "config.json"
                                    for n in os.listdir(out_dir)):
    raise FileExistsError(f"{out_dir} already holds a checkpoint; choose an empty directory")
  params, cfg, meta, tok_src = _load_source(ckpt_dir, step)
  problems = authors_code_problems(cfg)
  if problems and not allow_incompatible:
    raise IncompatibleModelError(
        f"{ckpt_dir}: the authors' code cannot run this model: " + "; ".join(problems)
        + ". Nothing was written. Pass --allow_incompatible to export it anyway (the weights "
        "stay exact and import_torch reads them back)")
  source_cfg = meta.get("torch_config") or meta.get("llm_config")
  config_json, tower_json = fusion_torch_config.fusion_config_to_torch(
      cfg, torch_dtype=dtype, model_max_length=model_max_length, source_config=source_cfg)
  os.makedirs(out_dir, exist_ok=True)
  files = write_safetensors(out_dir, fusion_torch.fusion_tensors_to_torch(params, cfg,
                                                                          dtype=leaf_dtype),
                            max_shard_bytes=max_bytes)
  tower = config_json["mm_vision_tower"]
  tower_dir = os.path.join(out_dir, tower)
  tower_tensors = ((k, v.astype(leaf_dtype)) for k, v in
                   siglip_tensors_to_torch(params["vision_tower"], "vision_model."))
  write_safetensors(tower_dir, tower_tensors, max_shard_bytes=max_bytes)
  with open(os.path.join(tower_dir, "config.json"), "w") as f:
    json.dump(tower_json, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)
  copied = []
  if tok_src and os.path.isdir(tok_src):
    for n in sorted(os.listdir(tok_src)):
      if os.path.isfile(os.path.join(tok_src, n)):
        shutil.copy2(os.path.join(tok_src, n), os.path.join(out_dir, n))
        copied.append(n)
  abs_out = os.path.abspath(out_dir)
  name = os.path.basename(os.path.normpath(abs_out))
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(README.format(
        description=fusion_torch.describe(cfg), source=os.path.abspath(ckpt_dir),
        architecture=config_json["architectures"][0], model_type=config_json["model_type"],
        dtype=dtype, out_dir=abs_out, name=name, tower=tower,
        tower_word="siglip2" if tower.startswith("siglip2") else "siglip",
        full_layers=cfg.vision.num_layers + 1, stored_layers=cfg.vision.num_layers,
        phi_rule=("and 'phi' (Phi models are routed on it)" if cfg.llm.arch == "phi3"
                  else "and must not contain 'phi', 'mistral', 'mpt' or 'qwen'"),
        incompatible=INCOMPATIBLE.format(problems="; ".join(problems)) if problems else ""))
  log(f"model: {fusion_torch.describe(cfg)}")
  log(f"wrote {out_dir}: {', '.join(files)} + {tower}/ ({cfg.vision.num_layers} stored tower "
      f"layers, config num_hidden_layers={cfg.vision.num_layers + 1})"
      + (f" + tokenizer files {copied}" if copied else ""))
  for problem in loader_name_problems(out_dir, cfg):
    log(f"WARNING: the directory name {name!r} breaks the authors' loader: {problem}; rename "
        "the directory (see README.md)")
  if not copied:
    log(f"note: {ckpt_dir} has no {TOKENIZER_NAME}/; copy the tokenizer files into {out_dir} "
        "for the authors' loader (it calls AutoTokenizer.from_pretrained on this directory)")
  for problem in problems:
    log(f"WARNING: exported with --allow_incompatible; the authors' code cannot run it: "
        f"{problem}")
  return problems


PROG = "python -m fusion_jax.convert.export_torch"
# CKPT_DIR: fusion_jax model dir (fusion_config.json + params/) or a training workdir (its
# newest checkpoint, or --step); OUT_DIR: output directory (its name should contain 'fusion',
# and 'phi' for Phi models).
POSITIONAL = ("ckpt_dir", "out_dir")


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli); positional CKPT_DIR OUT_DIR."""
  flags.DEFINE_enum("dtype", "float32", DTYPES, "parameter dtype written", flag_values=fv)
  flags.DEFINE_string("shard-size", "5GB", "max bytes per safetensors shard", flag_values=fv)
  flags.DEFINE_integer("model-max-length", 4096,
                       "tokenizer_model_max_length recorded in config.json", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step of a training workdir (default: the "
                       "newest)", flag_values=fv)
  flags.DEFINE_boolean("allow_incompatible", False,
                       "export a model the authors' code cannot run (tower patches other than "
                       "729/576, another tower depth, interaction heads != 16); README.md says "
                       "so", flag_values=fv)
  flags.DEFINE_alias("allow-incompatible", "allow_incompatible", flag_values=fv)


def _run(args) -> int:
  try:
    export_torch(args.ckpt_dir, args.out_dir, dtype=args.dtype, shard_size=args.shard_size,
                 model_max_length=args.model_max_length, step=args.step,
                 allow_incompatible=args.allow_incompatible)
  except (ValueError, KeyError, OSError) as e:
    print(f"export_torch: error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(cli.parse(define_flags, argv, PROG, POSITIONAL))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG, POSITIONAL)
