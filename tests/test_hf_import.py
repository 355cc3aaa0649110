"""transformers directories -> fusion_jax (load_hf_dir), the reverse export, importer errors and
the compare_hf tool."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import make_tiny_hf
from fusion_jax.convert import compare_hf
from fusion_jax.convert.hf import load_hf_dir
from fusion_jax.convert.hf_llm import llm_params_from_reader, llm_tensors_to_torch
from fusion_jax.convert.safetensors_io import INDEX_NAME, SafetensorsReader, write_safetensors
from fusion_jax.models.llm import stack_layers
from fusion_jax.models.llm_config import LLMConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hf_import"))
  return make_tiny_hf.make_all(root)


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _copy_with(src, dst, tensors=None, config=None):
  """Copy of a checkpoint directory with some tensors / config fields replaced."""
  os.makedirs(dst)
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg.update(config or {})
  json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
  data = load_file(os.path.join(src, "model.safetensors"))
  for k, v in (tensors or {}).items():
    if v is None:
      data.pop(k)
    else:
      data[k] = v
  write_safetensors(dst, data)
  return dst


@pytest.mark.parametrize("name", ["llama", "phi3", "llama_sharded"])
def test_import_export_round_trip(dirs, name):
  d = dirs[name]
  kind, cfg, params = load_hf_dir(d)
  assert kind == "llm" and cfg.arch == ("phi3" if name == "phi3" else "llama")
  if name == "llama_sharded":
    assert os.path.exists(os.path.join(d, INDEX_NAME))
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
  ref = load_file(os.path.join(d, "model.safetensors")) if name != "llama_sharded" else {
      k: SafetensorsReader(d).get(k) for k in SafetensorsReader(d).keys()}
  # Layout of one projection: torch (H*hd, D) row n*hd + j  <->  flax [:, n, j].
  q = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (cfg.hidden_size, cfg.num_heads, cfg.head_dim)
  if name == "phi3":
    torch_q = ref["model.layers.1.self_attn.qkv_proj.weight"][: cfg.num_heads * cfg.head_dim]
  else:
    torch_q = ref["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(q[:, 2, 5], torch_q[2 * cfg.head_dim + 5])
  for layout in (params, stack_layers(params)):
    out = dict(llm_tensors_to_torch(layout, cfg))
    assert sorted(out) == sorted(ref)
    for k, v in ref.items():
      np.testing.assert_array_equal(out[k], v, err_msg=k)


def test_exported_phi3_loads_in_transformers(dirs, tmp_path):
  import transformers
  kind, cfg, params = load_hf_dir(dirs["phi3"])
  out = str(tmp_path / "export")
  write_safetensors(out, llm_tensors_to_torch(params, cfg), max_shard_bytes=60_000)
  json.dump(cfg.to_hf(), open(os.path.join(out, "config.json"), "w"))
  assert os.path.exists(os.path.join(out, INDEX_NAME))  # streamed into several shards
  ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    a = transformers.Phi3ForCausalLM.from_pretrained(dirs["phi3"], dtype=torch.float32)(ids).logits
    b = transformers.Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
  np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_missing_tensor_is_named(dirs, tmp_path):
  d = _copy_with(dirs["llama"], str(tmp_path / "m"),
                 {"model.layers.1.mlp.up_proj.weight": None, "lm_head.weight": None})
  with pytest.raises(ValueError) as e:
    load_hf_dir(d)
  msg = str(e.value)
  assert "missing tensors (2)" in msg
  assert "model.layers.1.mlp.up_proj.weight" in msg and "lm_head.weight" in msg
  assert d in msg


def test_wrong_shape_names_key_and_both_shapes(dirs, tmp_path):
  d = _copy_with(dirs["llama"], str(tmp_path / "s"),
                 {"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)})
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint "
                                       r"\(48, 64\) vs config \(32, 64\)"):
    load_hf_dir(d)


def test_extra_tensors_are_listed_unless_known_buffers(dirs, tmp_path):
  extra = np.ones((64,), np.float32)
  d = _copy_with(dirs["llama"], str(tmp_path / "x"),
                 {"model.layers.2.input_layernorm.weight": extra,
                  "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones((8,), np.float32)})
  with pytest.raises(ValueError) as e:
    load_hf_dir(d)
  assert "unexpected tensors (1): model.layers.2.input_layernorm.weight" in str(e.value)
  _, cfg, params = load_hf_dir(d, strict=False)
  assert "layers_2" not in params


def test_unknown_architecture_lists_supported(dirs, tmp_path):
  d = _copy_with(dirs["llama"], str(tmp_path / "u"),
                 config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError) as e:
    load_hf_dir(d)
  msg = str(e.value)
  assert "GPT2LMHeadModel" in msg and "not supported" in msg
  for name in ("LlamaForCausalLM", "Phi3ForCausalLM", "SiglipVisionModel", "SiglipModel"):
    assert name in msg


def test_reader_prefix_and_dtype(dirs):
  reader = SafetensorsReader(dirs["phi3"])
  cfg = LLMConfig.from_hf(json.load(open(os.path.join(dirs["phi3"], "config.json"))))
  params = llm_params_from_reader(reader, cfg, dtype=np.float16)
  assert params["layers_0"]["mlp"]["gate_proj"]["kernel"].dtype == np.float16
  with pytest.raises(ValueError, match="missing tensors"):
    llm_params_from_reader(reader, cfg, prefix="language_model.model.")


def test_siglip_dirs_dispatch(dirs, tmp_path):
  kind, cfg, params = load_hf_dir(dirs["siglip"])
  assert kind == "siglip" and cfg.num_layers == 3 and "layers_2" in params
  # SiglipModel: the vision half is read from 'vision_model.*', the text half ignored.
  import transformers
  full = transformers.SiglipModel(transformers.SiglipConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16),
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8)))
  full.save_pretrained(str(tmp_path / "siglip_full"))
  kind, cfg, params = load_hf_dir(str(tmp_path / "siglip_full"))
  assert kind == "siglip" and cfg.num_layers == 2 and cfg.hidden_size == 48
  np.testing.assert_array_equal(
      params["embeddings"]["position_embedding"],
      full.vision_model.embeddings.position_embedding.weight.detach().numpy())


@pytest.mark.parametrize("name,argv", [("llama", ["--seq", "40"]), ("phi3", ["--seq", "40"]),
                                       ("siglip", [])])
def test_compare_hf_passes(dirs, name, argv, capsys):
  assert compare_hf.main([dirs[name], *argv]) == 0
  out = capsys.readouterr().out
  assert "PASS" in out and "max |diff|" in out


def test_compare_hf_fails_above_tolerance(dirs, capsys):
  assert compare_hf.main([dirs["llama"], "--seq", "40", "--atol", "1e-12"]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_compare_hf_cli(dirs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "fusion_jax.convert.compare_hf", dirs["phi3"],
                      "--seq", "40"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "longrope, long factors" in r.stdout and "PASS" in r.stdout
