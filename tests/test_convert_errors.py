"""Conversion errors name the file and the fix; export refuses models the authors' code cannot run.

Each test builds a few-file directory by hand (no model is converted unless the test needs it).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from fusion_jax.convert import export_torch, fusion_torch, fusion_torch_config, import_torch
from fusion_jax.convert.model_dir import save_model_dir
from fusion_jax.models.presets import FUSION_3B, FUSION_X_8B, TINY
from shape_readers import ShapeReader as _ShapeReader


def _src(tmp_path, config: str | None = '{"model_type": "fusion_llama"}', tensors=None):
  """A would-be authors' checkpoint dir: config.json text and a model.safetensors."""
  src = tmp_path / "src"
  src.mkdir()
  if config is not None:
    (src / "config.json").write_text(config)
  if tensors is not None:
    save_file(tensors, str(src / "model.safetensors"))
  return src


def _import_err(src, out, capsys, *extra) -> str:
  rc = import_torch.main([str(src), str(out), *extra])
  err = capsys.readouterr().err
  assert rc == 1 and err.startswith("import_torch: error: ") and err.count("\n") == 1, err
  assert not os.path.exists(out / "params")
  return err


def test_truncated_safetensors_names_the_file(tmp_path, capsys):
  src = _src(tmp_path, tensors={"model.embed_tokens.weight": np.ones((64, 32), np.float32)})
  path = src / "model.safetensors"
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  err = _import_err(src, tmp_path / "out", capsys)
  assert str(path) in err and "truncated or damaged" in err and "copy it again" in err


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "expected a JSON object"),       # a list: was an AttributeError deep inside
    ('{"model_type": ', "not valid JSON"),      # truncated
])
def test_bad_config_json_names_the_file(tmp_path, capsys, text, match):
  src = _src(tmp_path, config=text)
  err = _import_err(src, tmp_path / "out", capsys)
  assert str(src / "config.json") in err and match in err


def test_output_dir_is_checked_before_the_source(tmp_path, capsys):
  """An existing model dir as OUT_DIR fails first, even when the source has nothing to read."""
  out = tmp_path / "out"
  (out / "params").mkdir(parents=True)
  rc = import_torch.main([str(_src(tmp_path, config=None)), str(out)])
  err = capsys.readouterr().err
  assert rc == 1 and f"{out} already holds a model dir" in err


def test_unknown_non_local_tower_points_to_the_flag(tmp_path):
  cj, _ = fusion_torch_config.fusion_config_to_torch(TINY)
  cj = dict(cj, mm_vision_tower="someone/custom-siglip")  # a hub id: no config.json here
  with pytest.raises(ValueError, match="--tower-config DIR") as e:
    fusion_torch_config.fusion_config_from_torch(cj, None, _ShapeReader(TINY, str(tmp_path)))
  assert "someone/custom-siglip" in str(e.value) and "VisionConfig" not in str(e.value)


def test_authors_code_compatibility():
  assert export_torch.authors_code_problems(FUSION_3B) == []
  assert export_torch.authors_code_problems(FUSION_X_8B) == []
  problems = export_torch.authors_code_problems(TINY)
  assert len(problems) == 3
  assert "16 patches" in problems[0] and "729" in problems[0]
  assert "stores 3 layers" in problems[1] and "expect 26" in problems[1]
  assert "4 heads" in problems[2] and "hard-codes 16" in problems[2]
  # No interaction layers: their head count does not matter.
  assert len(export_torch.authors_code_problems(TINY.replace(interaction=False))) == 2


def test_sampler_layer_count_is_the_layers_present():
  """5 scheduled after layers 0, 2, 4, 6, 8 of a 4-layer LLM: 2 exist, and the fusion_jax
  block brings the configured schedule back."""
  cfg = TINY.replace(num_interaction=5)
  assert cfg.interaction_layers == (0, 2)
  cj, tower = fusion_torch_config.fusion_config_to_torch(cfg)
  assert cj["num_of_vision_sampler_layers"] == 2
  back = fusion_torch_config.fusion_config_from_torch(cj, tower, _ShapeReader(cfg, "x"))
  assert back == cfg
  cj.pop(fusion_torch_config.FUSION_JAX_KEY)  # the authors' form: what exists
  back = fusion_torch_config.fusion_config_from_torch(cj, tower, _ShapeReader(cfg, "x"))
  assert back.num_interaction == 2 and back.interaction_layers == (0, 2)


def test_export_refuses_incompatible_model_unless_allowed(tmp_path, capsys):
  cfg = TINY.replace(num_interaction=5)
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), fusion_torch.abstract_params(cfg))
  model = str(tmp_path / "model")
  save_model_dir(model, params, cfg)
  out = tmp_path / "torch_fusion_llama"
  rc = export_torch.main([model, str(out)])
  err = capsys.readouterr().err
  assert rc == 1 and err.count("\n") == 1 and not out.exists()
  for part in ("16 patches", "stores 3 layers", "4 heads", "--allow_incompatible"):
    assert part in err, part
  assert export_torch.main([model, str(out), "--allow_incompatible"]) == 0
  assert "cannot run it" in capsys.readouterr().out
  with open(out / "config.json") as f:
    assert json.load(f)["num_of_vision_sampler_layers"] == 2
  assert export_torch.loader_name_problems(str(out), cfg) == []
  assert export_torch.torch_dir_name(cfg) == out.name
