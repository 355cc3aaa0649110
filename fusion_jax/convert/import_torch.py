"""Import an authors' FUSION checkpoint (PyTorch, safetensors) into a fusion_jax model dir.

  python -m fusion_jax.convert.import_torch SRC_DIR OUT_DIR [--tower-config DIR]
      [--dtype float32|bfloat16]

SRC_DIR is a transformers save_pretrained directory of FusionPhiForCausalLM or
FusionLlamaForCausalLM (config.json + model.safetensors or shards + index), with a SigLIP or
SigLIP2 tower. The tower's shape comes from its own config.json: config.json's
`mm_vision_tower` is looked up relative to SRC_DIR first, then as given; a hub id that is not a
local directory falls back to inferring the tower from the stored shapes (known towers only;
say so with --tower-config DIR otherwise). Tensors are read and converted one at a time.
Tokenizer files found in SRC_DIR are copied to OUT_DIR/tokenizer/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from absl import flags

from fusion_jax import cli
from fusion_jax.convert import fusion_torch, fusion_torch_config
from fusion_jax.convert.model_dir import CONFIG_NAME, PARAMS_NAME, TOKENIZER_NAME, save_model_dir
from fusion_jax.convert.safetensors_io import SafetensorsReader
from fusion_jax.models.fusion import FusionConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
DTYPES = ("float32", "bfloat16")


def np_dtype(name: str):
  """numpy dtype of a --dtype name (bfloat16 via ml_dtypes)."""
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r}; choose one of {DTYPES}")
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.float32


def read_config_json(path: str, what: str = "config") -> dict[str, Any]:
  """A config.json as a dict; errors name the file and the fix (bad JSON, not an object)."""
  try:
    with open(path) as f:
      doc = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); the {what} file is damaged or truncated: "
                     "copy it again") from None
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not a text file; the {what} file is damaged: copy it "
                     "again") from None
  if not isinstance(doc, dict):
    raise ValueError(f"{path}: expected a JSON object (the {what} as key: value pairs), got a "
                     f"JSON {type(doc).__name__}; point at the checkpoint's own config.json")
  return doc


def check_out_dir(out_dir: str) -> None:
  """OUT_DIR must be a new or empty-of-model directory: checked before any tensor is read."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} is a file; choose a new directory for the model dir")
  taken = [n for n in (PARAMS_NAME, CONFIG_NAME) if os.path.exists(os.path.join(out_dir, n))]
  if taken:
    raise FileExistsError(f"{out_dir} already holds a model dir ({', '.join(taken)}); choose a "
                          "new directory or remove it first")


def find_tower_config(src_dir: str, config_json: dict[str, Any], tower_config: str | None,
                      log=print) -> dict[str, Any] | None:
  """The tower's config.json dict, or None (shapes will be inferred).

  tower_config: a directory holding config.json, or a config.json file; overrides the lookup.
  """
  if tower_config:
    path = (tower_config if os.path.isfile(tower_config)
            else os.path.join(tower_config, "config.json"))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--tower-config {tower_config}: no config.json there")
    log(f"tower config: {path}")
    return read_config_json(path, "tower config")
  name = config_json.get("mm_vision_tower")
  if not name:
    log("config.json has no mm_vision_tower; inferring the tower from the stored shapes")
    return None
  for cand in (os.path.join(src_dir, name), name):
    path = os.path.join(cand, "config.json")
    if os.path.isfile(path):
      log(f"tower config: {path}")
      return read_config_json(path, "tower config")
  log(f"mm_vision_tower {name!r} is not a local directory (relative to {src_dir} or the working "
      "directory), e.g. a hub id: inferring the tower from the stored shapes (known towers: "
      "SigLIP so400m/14@384, SigLIP2 giant-opt/16@384); pass --tower-config DIR to override")
  return None


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer files present in src_dir into dst_dir; returns their names."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if names:
    os.makedirs(dst_dir, exist_ok=True)
    for n in names:
      shutil.copy2(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return names


def import_torch(src_dir: str, out_dir: str, *, tower_config: str | None = None,
                 dtype: str = "float32", log=print) -> FusionConfig:
  """Converts SRC_DIR into the model dir OUT_DIR; returns the FusionConfig."""
  leaf_dtype = np_dtype(dtype)
  check_out_dir(out_dir)
  config_path = os.path.join(src_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{src_dir}: no config.json; point at the authors' FUSION checkpoint "
                            "directory (save_pretrained output)")
  config_json = read_config_json(config_path)
  reader = SafetensorsReader(src_dir)
  tower = find_tower_config(src_dir, config_json, tower_config, log)
  cfg = fusion_torch_config.fusion_config_from_torch(config_json, tower, reader)
  if dtype != "float32":
    # The stored leaves are `dtype`: say so, so that init-shaped code agrees with them.
    cfg = cfg.replace(llm=cfg.llm.replace(param_dtype=dtype),
                      vision=dataclasses.replace(cfg.vision, param_dtype=dtype))
  params = fusion_torch.fusion_params_from_reader(reader, cfg, dtype=leaf_dtype)
  dropped = fusion_torch.unused_interaction_layers(reader, cfg)
  if dropped:
    log(f"dropped stored interaction layers {dropped}: their schedule entries fall past the "
        f"LLM's {cfg.llm.num_layers} layers, so they never run")
  fusion_torch.check_param_shapes(params, cfg)
  meta = {"converted_by": "fusion_jax.convert.import_torch", "source": os.path.abspath(src_dir),
          "torch_config": config_json, "tower_config": tower}
  save_model_dir(out_dir, params, cfg, extra_meta=meta)
  copied = copy_tokenizer(src_dir, os.path.join(out_dir, TOKENIZER_NAME))
  preset = fusion_torch_config.matching_preset(cfg)
  log(f"model: {fusion_torch.describe(cfg)}")
  log(f"preset: {preset or 'none (custom architecture)'}; parameters: "
      f"{fusion_torch.param_count(params):,} ({dtype})")
  log(f"interaction layers after LLM layers {list(cfg.interaction_layers)}")
  log(f"compute dtype: LLM {cfg.llm.dtype}, tower {cfg.vision.dtype} (parameters stored in "
      f"{dtype}); infer / eval / serve --dtype overrides it at load time")
  if copied:
    log(f"tokenizer files copied to {os.path.join(out_dir, TOKENIZER_NAME)}: {copied}")
  log(f"wrote {out_dir}")
  return cfg


PROG = "python -m fusion_jax.convert.import_torch"
POSITIONAL = ("src_dir", "out_dir")  # SRC_DIR: FUSION checkpoint dir; OUT_DIR: new model dir


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli); positional SRC_DIR OUT_DIR."""
  flags.DEFINE_string("tower-config", None, "dir (or config.json) of the vision tower, if "
                      "mm_vision_tower is not local", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", DTYPES, "parameter dtype stored", flag_values=fv)


def _run(args) -> int:
  try:
    import_torch(args.src_dir, args.out_dir, tower_config=args.tower_config, dtype=args.dtype)
  except (ValueError, KeyError, OSError) as e:  # OSError: missing / existing / unreadable files
    print(f"import_torch: error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(cli.parse(define_flags, argv, PROG, POSITIONAL))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG, POSITIONAL)
