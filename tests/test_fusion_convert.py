"""FUSION checkpoint conversion: model dir <-> authors' torch layout, and the stage-1 start.

Every test uses tiny models; the CLIs run once each as `python -m` subprocesses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fusion_jax.convert import (export_torch, fusion_torch, fusion_torch_config, import_hf,
                                import_torch)
from fusion_jax.convert.hf import load_hf_dir
from fusion_jax.convert.model_dir import load_model_dir, load_model_meta, save_model_dir
from fusion_jax.convert.safetensors_io import SafetensorsReader, write_safetensors
from fusion_jax.models import fusion
from fusion_jax.models.llm import Decoder
from fusion_jax.models.presets import FUSION_3B, FUSION_8B, FUSION_X_3B, FUSION_X_8B, TINY
from fusion_jax.models.rope import LongRopeScaling
from fusion_jax.models.vision import VisionTower

sys.path.insert(0, os.path.dirname(__file__))
from make_tiny_hf import make_tiny_llama, make_tiny_siglip  # noqa: E402
from shape_readers import ShapeReader  # noqa: E402

PHI_TINY = TINY.replace(
    llm=TINY.llm.replace(
        arch="phi3", num_kv_heads=4, max_position_embeddings=128,
        rope_scaling=LongRopeScaling(short_factor=(1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0),
                                     long_factor=(1.1, 1.4, 2.0, 3.5, 6.0, 10.0, 16.0, 24.0),
                                     original_max_position_embeddings=32)),
    template="phi_3")
# config.json entries that belong to FUSION, not to the base LLM config.
FUSION_FIELDS = {
    "model_type", "architectures", "query_len", "window_size", "num_of_vision_sampler_layers",
    "start_of_vision_sampler_layers", "stride_of_vision_sampler_layers", "image_aspect_ratio",
    "unfreeze_mm_vision_tower", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
    "tokenizer_model_max_length", "tokenizer_padding_side", fusion_torch_config.FUSION_JAX_KEY}


def random_params(cfg, seed: int) -> dict:
  """Fusion(cfg)-shaped numpy params with O(1) activations: norms 1 + noise, biases small."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if "scale" in name:
      return 1.0 + 0.1 * noise
    if "bias" in name:
      return 0.05 * noise
    return 0.08 * noise

  return jax.tree_util.tree_map_with_path(leaf, fusion_torch.abstract_params(cfg))


def run_cli(module: str, *args: str) -> str:
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=os.environ.copy(), timeout=300)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout + proc.stderr


def assert_trees_equal(a, b):
  la = jax.tree_util.tree_leaves_with_path(a)
  lb = jax.tree_util.tree_leaves_with_path(b)
  assert [jax.tree_util.keystr(p) for p, _ in la] == [jax.tree_util.keystr(p) for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(p)
    assert np.array_equal(x, y), jax.tree_util.keystr(p)


@pytest.fixture(scope="module")
def tiny_params():
  return random_params(TINY, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_params):
  """TINY -> model dir -> export_torch CLI (sharded) -> import_torch CLI."""
  root = tmp_path_factory.mktemp("roundtrip")
  md = str(root / "model")
  save_model_dir(md, tiny_params, TINY)
  out = str(root / "fusion_tiny_llama")
  export_log = run_cli("fusion_jax.convert.export_torch", md, out, "--shard-size", "100KB",
                       "--allow_incompatible")  # TINY is smaller than the authors' code allows
  back = str(root / "model_back")
  import_log = run_cli("fusion_jax.convert.import_torch", out, back)
  return dict(model=md, out=out, back=back, export_log=export_log, import_log=import_log)


def test_round_trip_bitwise(exported, tiny_params):
  params, cfg = load_model_dir(exported["back"])
  assert cfg == TINY
  assert_trees_equal(jax.tree.map(np.asarray, params), tiny_params)
  meta = load_model_meta(exported["back"])
  assert meta["converted_by"] == "fusion_jax.convert.import_torch"
  assert "interaction layers after LLM layers [0, 2]" in exported["import_log"]


def test_model_dir_restores_into_shardings(exported, tiny_params):
  from fusion_jax.parallel.sharding import make_mesh, param_shardings
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = fusion.example_batch(TINY, batch_size=1, seq_len=8, max_questions=1, q=1, seed=None)
  abstract = jax.eval_shape(lambda: fusion.init(jax.random.key(0), TINY, batch))
  shardings = param_shardings(abstract, mesh)["params"]
  params, _ = load_model_dir(exported["model"], shardings=shardings, dtype=np.dtype("bfloat16"))
  emb = params["llm"]["embed_tokens"]["embedding"]
  assert emb.sharding == shardings["llm"]["embed_tokens"]["embedding"]
  assert emb.dtype == np.dtype("bfloat16") and len(emb.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(emb, np.float32),
                                tiny_params["llm"]["embed_tokens"]["embedding"].astype(
                                    np.dtype("bfloat16")).astype(np.float32))
  with pytest.raises(ValueError, match="not a fusion_jax model dir"):
    load_model_dir(exported["out"])


def test_export_layout(exported):
  out = exported["out"]
  with open(os.path.join(out, "config.json")) as f:
    cj = json.load(f)
  assert cj["model_type"] == "fusion_llama"
  assert cj["architectures"] == ["FusionLlamaForCausalLM"]
  assert cj["mm_vision_tower"] == "siglip_vision_tower"
  assert (cj["mm_hidden_size"], cj["query_len"], cj["window_size"]) == (32, "1,4", 3)
  assert (cj["num_of_vision_sampler_layers"], cj["start_of_vision_sampler_layers"],
          cj["stride_of_vision_sampler_layers"]) == (2, 0, 2)
  assert (cj["mm_projector_type"], cj["mm_vision_select_layer"], cj["image_aspect_ratio"]) == (
      "mlp2x_gelu", -2, "static_hd")
  assert cj["mm_use_im_start_end"] is True and cj["mm_use_im_patch_token"] is False
  assert cj["rope_theta"] == 10000.0 and cj["rope_scaling"] is None
  # Sharded with an index; exactly the expected keys and shapes.
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  reader = SafetensorsReader(out)
  expected = fusion_torch.expected_torch_shapes(TINY)
  assert sorted(reader.keys()) == sorted(expected)
  assert all(tuple(reader.shape(k)) == s for k, s in expected.items())
  assert "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias" in expected
  assert not any("encoder.layers.3." in k for k in expected)
  with open(os.path.join(out, "siglip_vision_tower", "config.json")) as f:
    tower = json.load(f)
  assert tower["num_hidden_layers"] == TINY.vision.num_layers + 1
  assert tower["model_type"] == "siglip_vision_model"
  assert "breaks the authors' loader" not in exported["export_log"]  # the folder name is fine
  # --allow_incompatible: every mismatch is logged and README.md says so.
  assert exported["export_log"].count("--allow_incompatible; the authors' code cannot") == 3
  with open(os.path.join(out, "README.md")) as f:
    assert "The authors' code cannot run this model" in f.read()


def _torch_llm(cfg, tensors):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
  cj, _ = fusion_torch_config.fusion_config_to_torch(cfg)
  base = {k: v for k, v in cj.items() if k not in FUSION_FIELDS and not k.startswith("mm_")}
  conf_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if cfg.llm.arch == "llama"
                         else (Phi3Config, Phi3ForCausalLM))
  model = model_cls(conf_cls.from_dict(base)).eval().float()
  llm_keys = {k: torch.from_numpy(np.array(v)) for k, v in tensors
              if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm."))
              or k == "lm_head.weight"}
  model.load_state_dict(llm_keys, strict=True)
  return model


@pytest.mark.parametrize("cfg_name,seq", [("llama", 12), ("phi3", 40)])
def test_exported_llm_matches_transformers(cfg_name, seq, tiny_params):
  import torch
  cfg = TINY if cfg_name == "llama" else PHI_TINY
  params = tiny_params if cfg_name == "llama" else random_params(PHI_TINY, seed=1)
  model = _torch_llm(cfg, fusion_torch.fusion_tensors_to_torch(params, cfg))
  ids = np.random.default_rng(3).integers(0, cfg.llm.vocab_size, (2, seq)).astype(np.int32)
  pos = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape)
  ours, _ = Decoder(cfg.llm).apply({"params": params["llm"]}, ids, pos, np.ones_like(ids, bool),
                                   method=Decoder.forward)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert np.abs(theirs).max() > 0.1  # non-trivial logits
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_exported_tower_loads_into_siglip(exported, tiny_params):
  import torch
  from transformers import SiglipVisionModel
  model = SiglipVisionModel.from_pretrained(os.path.join(exported["out"], "siglip_vision_tower"))
  model = model.eval().float()
  size = TINY.vision.image_size
  pixels = np.random.default_rng(4).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  ours = VisionTower(TINY.vision).apply({"params": tiny_params["vision_tower"]}, pixels)
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                   output_hidden_states=True).hidden_states
  assert len(theirs) == TINY.vision.num_layers + 2  # + the random last layer
  for i in range(TINY.vision.num_layers + 1):
    np.testing.assert_allclose(np.asarray(ours[i]), theirs[i].numpy(), atol=1e-4, rtol=0,
                               err_msg=f"hidden state {i}")


@pytest.fixture(scope="module")
def stored(exported):
  reader = SafetensorsReader(exported["out"])
  tensors = {k: reader.get(k) for k in reader.keys()}
  with open(os.path.join(exported["out"], "config.json")) as f:
    cj = json.load(f)
  with open(os.path.join(exported["out"], "siglip_vision_tower", "config.json")) as f:
    tower = json.load(f)
  return tensors, cj, tower


def _bad_dir(path, tensors, cj):
  os.makedirs(path)
  write_safetensors(str(path), tensors)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cj, f)
  return str(path)


def _load(directory, cj, tower):
  reader = SafetensorsReader(directory)
  cfg = fusion_torch_config.fusion_config_from_torch(cj, tower, reader)
  return fusion_torch.fusion_params_from_reader(reader, cfg)


def test_import_rejects_missing_key(tmp_path, stored, capsys):
  tensors, cj, tower = stored
  gone = "model.mm_projector.2.bias"
  d = _bad_dir(tmp_path / "missing", {k: v for k, v in tensors.items() if k != gone}, cj)
  with pytest.raises(ValueError, match="missing tensors") as e:
    _load(d, cj, tower)
  assert gone in str(e.value)
  # The CLI reports the same and exits 1 (tower config passed explicitly).
  tower_dir = tmp_path / "tower"
  tower_dir.mkdir()
  (tower_dir / "config.json").write_text(json.dumps(tower))
  rc = import_torch.main([d, str(tmp_path / "never"), "--tower-config", str(tower_dir)])
  assert rc == 1 and gone in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "never")


def test_import_rejects_wrong_shape(tmp_path, stored):
  tensors, cj, tower = stored
  key = "model.aux_projector.0.weight"
  bad = dict(tensors, **{key: np.zeros((7, 64), np.float32)})
  with pytest.raises(ValueError, match="shape mismatches") as e:
    _load(_bad_dir(tmp_path / "shape", bad, cj), cj, tower)
  assert f"{key}: stored (7, 64) vs expected (32, 64)" in str(e.value)


def test_import_rejects_unexpected_key(tmp_path, stored):
  tensors, cj, tower = stored
  extra = "model.image_newline"
  bad = dict(tensors, **{extra: np.zeros((64,), np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors") as e:
    _load(_bad_dir(tmp_path / "extra", bad, cj), cj, tower)
  assert extra in str(e.value)


def test_import_rejects_unknown_model_type_and_tower_depth(tmp_path, stored):
  tensors, cj, tower = stored
  d = _bad_dir(tmp_path / "mt", tensors, cj)
  with pytest.raises(ValueError, match="'fusion_qwen'") as e:
    fusion_torch_config.fusion_config_from_torch(dict(cj, model_type="fusion_qwen"), tower,
                                          SafetensorsReader(d))
  assert "fusion_phi" in str(e.value) and "fusion_llama" in str(e.value)
  with pytest.raises(ValueError, match="stores 3 tower encoder layers.*num_hidden_layers=3"):
    fusion_torch_config.fusion_config_from_torch(cj, dict(tower, num_hidden_layers=3),
                                          SafetensorsReader(d))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  llama, siglip = str(root / "llama"), str(root / "siglip")
  make_tiny_llama(llama)
  make_tiny_siglip(siglip)
  return llama, siglip


def _check_stage1(out, llama_dir, siglip_dir, n_old):
  params, cfg = load_model_dir(out)
  params = jax.tree.map(np.asarray, params)
  _, _, src = load_hf_dir(llama_dir, weights_dtype=np.float32)
  assert cfg.llm.vocab_size == n_old + 2
  for path, x in jax.tree_util.tree_leaves_with_path(src):
    name = jax.tree_util.keystr(path)
    node = params["llm"]
    for p in path:
      node = node[p.key]
    if "embed_tokens" in name:
      old, new = x[:n_old], node[n_old:]
      np.testing.assert_array_equal(node[:n_old], old)
    elif "lm_head" in name:
      old, new = x[:, :n_old].T, node[:, n_old:].T
      np.testing.assert_array_equal(node[:, :n_old], x[:, :n_old])
    else:
      np.testing.assert_array_equal(node, x, err_msg=name)
      continue
    assert new.shape == (2, cfg.llm.hidden_size)
    np.testing.assert_allclose(new, np.broadcast_to(old.mean(0), new.shape), rtol=1e-6, atol=1e-7)
  _, vcfg, tower = load_hf_dir(siglip_dir, weights_dtype=np.float32)
  assert cfg.vision.num_layers == vcfg.num_layers - 1
  tower.pop(f"layers_{vcfg.num_layers - 1}")
  assert_trees_equal(params["vision_tower"], tower)
  return params, cfg


def test_import_hf_stage1(tmp_path, hf_dirs):
  llama, siglip = hf_dirs
  out = str(tmp_path / "stage1")
  with pytest.raises(ValueError, match="--template 'chatml': use one of"):
    import_hf.import_hf(llama, siglip, "tiny", out, template="chatml")
  import_hf.import_hf(llama, siglip, "tiny", out, seed=0)
  params, cfg = _check_stage1(out, llama, siglip, n_old=128)
  assert cfg.interaction_layers == (0,)  # tiny llama has 2 layers: schedule entry 2 skipped
  assert cfg.vision.hidden_size == 48 and cfg.llm.rope_scaling is not None
  batch = fusion.example_batch(cfg, batch_size=2, seq_len=48, max_questions=2, q=4, seed=0)
  loss, aux = jax.jit(lambda p, b: fusion.loss_fn(p, b, cfg))(params, batch)
  assert np.isfinite(float(loss))

  # Export (llama3 RoPE scaling, 2 scheduled interaction layers of which 1 runs): the config
  # counts the layer that exists. Then write what the authors' code saves for that schedule (a
  # module per entry, the never-run one included): import drops it.
  torch_dir = str(tmp_path / "fusion_stage1_llama")
  export_torch.export_torch(out, torch_dir, shard_size="10GB", allow_incompatible=True)
  with open(os.path.join(torch_dir, "config.json")) as f:
    cj = json.load(f)
  assert cj["num_of_vision_sampler_layers"] == 1
  assert cj["rope_scaling"]["rope_type"] == "llama3"
  cj["num_of_vision_sampler_layers"] = 2
  with open(os.path.join(torch_dir, "config.json"), "w") as f:
    json.dump(cj, f)
  reader = SafetensorsReader(torch_dir)
  tensors = {k: reader.get(k) for k in reader.keys()}
  tensors.update({k.replace("sampler_layers.0.", "sampler_layers.1."): v for k, v in tensors.items()
                  if k.startswith("model.vision_sampler_layers.0.")})
  write_safetensors(torch_dir, tensors)
  back = str(tmp_path / "stage1_back")
  logs = []
  assert import_torch.import_torch(torch_dir, back, log=logs.append) == cfg
  assert any("dropped stored interaction layers [1]" in line for line in logs)
  assert_trees_equal(jax.tree.map(np.asarray, load_model_dir(back)[0]), params)


def test_import_hf_cli_with_tokenizer(tmp_path, hf_dirs):
  """Tokenizer shorter than the embedding (as Phi-3.5): vocab = len(tokenizer) + 2."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from fusion_jax.data.tokenizer import load_tokenizer
  from fusion_jax.data.tokenizer_train import train_bpe_tokenizer_json
  _, siglip = hf_dirs
  llm_dir = str(tmp_path / "llm_tok")
  texts = [f"a small caption number {i} about red cubes and blue spheres" for i in range(50)]
  train_bpe_tokenizer_json(texts, llm_dir, vocab_size=300)
  n_tok = load_tokenizer(llm_dir).vocab_size - 2
  torch.manual_seed(0)
  model = LlamaForCausalLM(LlamaConfig(
      vocab_size=n_tok + 6, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
      tie_word_embeddings=False, pad_token_id=0))
  model.save_pretrained(llm_dir)
  out = str(tmp_path / "stage1_tok")
  log = run_cli("fusion_jax.convert.import_hf", "--llm", llm_dir, "--vision", siglip,
                "--preset", "tiny", "--out", out, "--seed", "1", "--template", "phi_3")
  assert f"resized to {n_tok} + 2" in log
  _, cfg = _check_stage1(out, llm_dir, siglip, n_old=n_tok)
  # --template overrides the preset's (llama_3), and a mismatch with the LLM is said.
  assert cfg.template == "phi_3"
  assert "WARNING: --template gives template 'phi_3' but the LLM is llama" in log
  tok = load_tokenizer(os.path.join(out, "tokenizer"))
  assert (tok.vision_start_id, tok.vision_end_id) == (n_tok, n_tok + 1)


@pytest.mark.parametrize("name", ["fusion_3b", "fusion_8b", "fusion_x_3b", "fusion_x_8b", "phi"])
def test_config_round_trip_authors_form(name, tmp_path):
  """Without the fusion_jax entry (an authors' config.json), paper presets come back exactly;
  the tower from its config.json or, as for a hub id, from the stored shapes."""
  cfg = {"fusion_3b": FUSION_3B, "fusion_8b": FUSION_8B, "fusion_x_3b": FUSION_X_3B,
         "fusion_x_8b": FUSION_X_8B, "phi": PHI_TINY}[name]
  cj, tower = fusion_torch_config.fusion_config_to_torch(cfg)
  cj.pop(fusion_torch_config.FUSION_JAX_KEY)
  reader = ShapeReader(cfg, str(tmp_path))
  back = fusion_torch_config.fusion_config_from_torch(cj, tower, reader)
  if name == "phi":  # fields the authors' config cannot carry fall back to the paper's
    assert back.llm == cfg.llm.replace(dtype="bfloat16", pad_token_id=0)
    assert back.vision == dataclasses.replace(cfg.vision, dtype="bfloat16")
    assert (back.interaction_heads, back.max_instruct_len) == (16, 256)
    assert back.interaction_layers == cfg.interaction_layers and back.template == "phi_3"
    return
  assert back == cfg
  assert fusion_torch_config.fusion_config_from_torch(cj, None, reader) == cfg
  assert fusion_torch_config.matching_preset(back) == name
  expected_tower = "siglip2_vision_tower" if "_x_" in name else "siglip_vision_tower"
  assert cj["mm_vision_tower"] == expected_tower


def test_tower_config_lookup(tmp_path, stored):
  _, cj, tower = stored
  logs = []
  assert import_torch.find_tower_config(str(tmp_path), dict(cj, mm_vision_tower="google/x"), None,
                                        logs.append) is None
  assert "not a local directory" in logs[-1] and "--tower-config" in logs[-1]
  (tmp_path / "siglip_tower").mkdir()
  (tmp_path / "siglip_tower" / "config.json").write_text(json.dumps(tower))
  got = import_torch.find_tower_config(str(tmp_path), dict(cj, mm_vision_tower="siglip_tower"),
                                       None, logs.append)
  assert got == tower
