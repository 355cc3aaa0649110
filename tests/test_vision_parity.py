"""VisionTower vs transformers' SiglipVisionModel, weights moved through the SigLIP importer
(save_pretrained -> SafetensorsReader -> siglip_params_from_reader) and back
(siglip_tensors_to_torch -> strict load_state_dict)."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from fusion_jax.convert.hf_siglip import (_key_table, siglip_config_from_hf,
                                          siglip_config_from_reader, siglip_params_from_reader,
                                          siglip_prefix, siglip_tensors_to_torch, siglip_torch_keys)
from fusion_jax.convert.safetensors_io import SafetensorsReader, write_safetensors
from fusion_jax.models.vision import (SIGLIP2_GIANT_OPT_16_384, SIGLIP_SO400M_14_384, VisionConfig,
                                      VisionTower, fusion_tower)
from shape_readers import ShapeOnlyReader as _ShapeOnlyReader

B = 2
HF_KW = dict(image_size=32, patch_size=8, hidden_size=64, num_attention_heads=4,
             intermediate_size=96, num_hidden_layers=3, vision_use_head=False)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """A tiny random SiglipVisionModel (all params perturbed so biases/LN are non-trivial),
  saved with save_pretrained, plus its outputs on random pixels."""
  torch.manual_seed(0)
  model = SiglipVisionModel(SiglipVisionConfig(**HF_KW, attn_implementation="eager")).eval().float()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp("siglip"))
  model.save_pretrained(directory)
  pixels = torch.randn(B, 3, 32, 32)
  with torch.no_grad():
    out = model(pixel_values=pixels, output_hidden_states=True)
  return dict(model=model, dir=directory, pixels=pixels.numpy(),
              hidden_states=[h.numpy() for h in out.hidden_states],
              last=out.last_hidden_state.numpy())


@pytest.fixture(scope="module")
def cfg(hf):
  with open(os.path.join(hf["dir"], "config.json")) as f:
    c = siglip_config_from_hf(json.load(f))
  return dataclasses.replace(c, dtype="float32")


@pytest.fixture(scope="module")
def params(hf):
  return siglip_params_from_reader(SafetensorsReader(hf["dir"]), "")


def _forward(cfg):
  tower = VisionTower(cfg)

  @jax.jit
  def run(params, pixels):
    hs = tower.apply({"params": params}, pixels)
    return hs, tower.apply({"params": params}, hs[-1], method=VisionTower.post_norm)

  return run


def test_config_from_hf(cfg):
  assert cfg == VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96,
                             num_layers=3, num_heads=4, dtype="float32")
  # SiglipConfig form, fields left at the transformers default omitted (as older hubs save).
  nested = {"model_type": "siglip", "text_config": {}, "vision_config": {
      "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
      "patch_size": 14}}
  assert siglip_config_from_hf(nested) == SIGLIP_SO400M_14_384
  with pytest.raises(ValueError, match="not a SigLIP vision tower"):
    siglip_config_from_hf({"model_type": "clip_vision_model"})
  assert VisionConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown keys"):
    VisionConfig.from_dict({**cfg.to_dict(), "hidden": 3})


def test_presets():
  for preset, n, layers in ((SIGLIP_SO400M_14_384, 729, 26), (SIGLIP2_GIANT_OPT_16_384, 576, 39)):
    assert preset.num_patches == n
    assert fusion_tower(preset).num_layers == layers
    # The key table's torch shapes agree with the flax params of the real towers (1 layer is
    # enough: every layer has the same shapes).
    one = dataclasses.replace(preset, num_layers=1)
    shapes = jax.eval_shape(VisionTower(one).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32))
    flat = {k: v for k, v in siglip_tensors_to_torch(
        jax.tree.map(lambda s: np.zeros(s.shape, np.float32), nn.unbox(shapes)), "")}
    assert list(flat) == siglip_torch_keys(1)
    dv, f = preset.hidden_size, preset.intermediate_size
    assert flat["embeddings.patch_embedding.weight"].shape == (dv, 3, preset.patch_size, preset.patch_size)
    assert flat["embeddings.position_embedding.weight"].shape == (n, dv)
    assert flat["encoder.layers.0.self_attn.q_proj.weight"].shape == (dv, dv)
    assert flat["encoder.layers.0.mlp.fc1.weight"].shape == (f, dv)


def test_hidden_states_match_transformers(hf, cfg, params):
  hs, last = _forward(cfg)(params, jnp.asarray(hf["pixels"].transpose(0, 2, 3, 1)))
  assert len(hs) == len(hf["hidden_states"]) == cfg.num_layers + 1
  for i, (ours, theirs) in enumerate(zip(hs, hf["hidden_states"])):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0, err_msg=f"hs[{i}]")
  np.testing.assert_allclose(np.asarray(last), hf["last"], atol=1e-4, rtol=0)


def test_remat_policy_same_outputs(hf, cfg, params):
  pixels = jnp.asarray(hf["pixels"].transpose(0, 2, 3, 1))
  hs, _ = _forward(dataclasses.replace(cfg, remat_policy="full"))(params, pixels)
  np.testing.assert_allclose(np.asarray(hs[-1]), hf["hidden_states"][-1], atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="remat policy"):
    dataclasses.replace(cfg, remat_policy="sometimes")


def test_export_loads_strictly_into_torch(hf, params):
  original = hf["model"].state_dict()
  exported = {k: torch.from_numpy(v.copy()) for k, v in siglip_tensors_to_torch(params, "")}
  assert set(exported) == set(original)
  for k, v in exported.items():
    assert torch.equal(v, original[k]), k  # the round trip is exact
  fresh = SiglipVisionModel(SiglipVisionConfig(**HF_KW, attn_implementation="eager")).eval().float()
  fresh.load_state_dict(exported, strict=True)
  with torch.no_grad():
    out = fresh(pixel_values=torch.from_numpy(hf["pixels"]))
  np.testing.assert_array_equal(out.last_hidden_state.numpy(), hf["last"])


def test_fusion_truncation_and_prefix(hf, cfg, params, tmp_path):
  # FUSION reads the first L-1 layers only; the result is the full tower's params minus the last.
  reader = SafetensorsReader(hf["dir"])
  cut = siglip_params_from_reader(reader, "", num_layers=2)
  assert sorted(cut) == ["embeddings", "layers_0", "layers_1", "post_layernorm"]
  jax.tree.map(np.testing.assert_array_equal, cut, {k: v for k, v in params.items() if k != "layers_2"})
  # A FUSION-style prefix with no SigLIP config.json: the config must be given (tiny tower is not
  # a known preset), and with it the import is exact.
  prefix = "model.vision_tower.vision_tower.vision_model."
  write_safetensors(str(tmp_path), siglip_tensors_to_torch(cut, prefix))
  other = SafetensorsReader(str(tmp_path))
  with pytest.raises(ValueError, match="pass config="):
    siglip_params_from_reader(other, prefix)
  back = siglip_params_from_reader(other, prefix, config=cfg)
  jax.tree.map(np.testing.assert_array_equal, back, cut)
  assert siglip_config_from_reader(reader, "", 2).num_layers == 2


def test_import_errors(hf, cfg, params, tmp_path):
  tensors = dict(siglip_tensors_to_torch(params, ""))
  # Missing tensors are all listed.
  dropped = ["encoder.layers.1.mlp.fc1.bias", "post_layernorm.weight"]
  write_safetensors(str(tmp_path / "missing"), ((k, v) for k, v in tensors.items() if k not in dropped))
  with pytest.raises(KeyError) as e:
    siglip_params_from_reader(SafetensorsReader(str(tmp_path / "missing")), "", config=cfg)
  assert all(k in str(e.value) for k in dropped)
  # Asking for more layers than stored lists the absent layer's tensors.
  with pytest.raises(KeyError, match=r"encoder\.layers\.3\.layer_norm1\.weight"):
    siglip_params_from_reader(SafetensorsReader(hf["dir"]), "", num_layers=4)
  # A shape mismatch names the key and both shapes.
  wrong = dataclasses.replace(cfg, intermediate_size=80)
  with pytest.raises(ValueError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight has shape \(96, 64\), "
                                       r"expected \(80, 64\)"):
    siglip_params_from_reader(SafetensorsReader(hf["dir"]), "", config=wrong)
  # A wrong prefix says so.
  with pytest.raises(KeyError, match="prefix"):
    siglip_params_from_reader(SafetensorsReader(hf["dir"]), "vision_model.")


def test_logical_axis_names_on_all_params(cfg):
  boxed = jax.eval_shape(VisionTower(cfg).init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) == 3 + 16 * cfg.num_layers + 2
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    assert any(n is not None for n in leaf.names), name


def test_config_inferred_for_known_towers():
  prefix = "model.vision_tower.vision_tower.vision_model."
  for preset in (SIGLIP_SO400M_14_384, SIGLIP2_GIANT_OPT_16_384):
    tower = fusion_tower(preset)
    shapes = {prefix + suffix: shape(tower) for suffix, _, _, shape in _key_table(tower.num_layers)}
    shapes["model.embed_tokens.weight"] = (512, 256)
    reader = _ShapeOnlyReader(shapes)
    assert siglip_prefix(reader) == prefix
    assert siglip_config_from_reader(reader, prefix) == tower
