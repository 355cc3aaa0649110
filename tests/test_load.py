"""One loader for "a model": training workdirs (newest or --step) and model dirs, --dtype."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fusion_jax.infer.load import load_model, params_for_config
from fusion_jax.models import param_layout
from tests.model_fixtures import make_model_dir, make_workdir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("load"))
  model_dir, cfg, params = make_model_dir(root)
  workdir, saved = make_workdir(root)
  return dict(root=root, model_dir=model_dir, cfg=cfg, params=params, workdir=workdir,
              saved=saved)


def _same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_model_dir(dirs):
  m = load_model(dirs["model_dir"])
  assert m.kind == "model_dir" and m.step is None and m.name == "fusion_tiny"
  assert m.cfg == dirs["cfg"]
  _same(m.params, dirs["params"])
  assert m.q == max(m.cfg.query_len) and m.seq_len == m.cfg.llm.max_position_embeddings
  assert m.tokenizer.vocab_size == m.cfg.llm.vocab_size
  with pytest.raises(ValueError, match="model dir .*--step applies to training workdirs"):
    load_model(dirs["model_dir"], step=3)


def test_workdir_newest_and_step(dirs):
  m = load_model(dirs["workdir"])
  assert (m.kind, m.step, m.seq_len, m.max_questions, m.q) == ("workdir", 5, 128, 2, 1)
  assert m.name == "run@5" and m.image_root == dirs["root"]
  _same(m.params, dirs["saved"][5])
  assert m.cfg.template == "phi_3" and m.tokenizer.pad_id == m.cfg.llm.pad_token_id
  _same(load_model(dirs["workdir"], step=2).params, dirs["saved"][2])
  with pytest.raises(FileNotFoundError, match=r"no complete checkpoint at step 3; steps: \[2, 5\]"):
    load_model(dirs["workdir"], step=3)


def test_dtype_overrides_compute_dtype(dirs):
  m = load_model(dirs["model_dir"], dtype="bfloat16")
  assert m.cfg.llm.dtype == m.cfg.vision.dtype == "bfloat16"
  assert m.cfg.llm.param_dtype == "float32"  # stored params are not cast
  assert load_model(dirs["workdir"], dtype="bfloat16").cfg.llm.dtype == "bfloat16"
  with pytest.raises(ValueError, match="--dtype 'float16'"):
    load_model(dirs["model_dir"], dtype="float16")


def test_seq_len_overrides_the_prompt_limit(dirs):
  # A run evaluated on prompts longer than it trained on: positions up to the LLM's table.
  assert load_model(dirs["workdir"], seq_len=200).seq_len == 200
  m = load_model(dirs["model_dir"], seq_len=64)
  assert m.seq_len == 64 and m.cfg == dirs["cfg"]
  limit = m.cfg.llm.max_position_embeddings
  with pytest.raises(ValueError, match=rf"--seq_len {limit + 1}: must be in 1..{limit}"):
    load_model(dirs["model_dir"], seq_len=limit + 1)


def test_not_a_model(tmp_path):
  (tmp_path / "x.txt").write_text("hi")
  with pytest.raises(FileNotFoundError, match="neither a model dir .* nor a training workdir"):
    load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such directory"):
    load_model(str(tmp_path / "missing"))


def test_params_for_config_converts_the_layer_layout(dirs):
  cfg, params = dirs["cfg"], dirs["params"]
  scan_cfg = cfg.replace(llm=cfg.llm.replace(scan_layers=True))
  scanned = params_for_config(params, scan_cfg)  # unrolled storage -> scanned config
  assert param_layout.is_scanned(scanned) and not param_layout.is_scanned(params)
  _same(params_for_config(scanned, cfg), params)  # scanned storage -> unrolled config
  _same(params_for_config(params, cfg), params)


def test_infer_cli_on_a_model_dir(dirs):
  """The issue's failing command: infer --workdir <imported dir>."""
  from PIL import Image
  img = os.path.join(dirs["root"], "q.png")
  Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
  out = subprocess.run(
      [sys.executable, "-m", "fusion_jax.infer", "--workdir", dirs["model_dir"], "--image", img,
       "--question", "What color is the ball?", "--max_new_tokens", "3", "--dtype", "float32"],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  assert len(lines) == 1 and isinstance(lines[0]["answer"], str)
  assert "fusion_tiny" in out.stdout


def test_eval_on_a_model_dir(dirs, tmp_path):
  from fusion_jax.eval.evaluate import run_eval
  from PIL import Image
  Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
  data = tmp_path / "heldout.json"
  data.write_text(json.dumps([
      {"id": "a", "image": "a.png", "category": "SynthColor",
       "conversations": [{"from": "human", "value": "<image>\nWhat color is the ball?"},
                         {"from": "gpt", "value": "red"}],
       "qa": [{"answer": "red", "answer_type": "color", "candidates": ["red", "blue"]}]}]))
  with pytest.raises(ValueError, match="is a model dir: pass --data FILE"):
    run_eval(dirs["model_dir"], write=False)
  out = run_eval(dirs["model_dir"], data=str(data), seq_len=128, batch_size=2, write=False)
  assert out["step"] is None and out["q"] == max(dirs["cfg"].query_len)
  assert out["categories"]["all"]["count"] == 1


def test_authors_layout_round_trip_loads(dirs, tmp_path):
  """export_torch (from a model dir and from a workdir --step) -> import_torch -> load_model:
  the imported dir answers like its source (same config, weights, tokenizer); the import log
  states the compute dtype."""
  from fusion_jax.convert.export_torch import export_torch
  from fusion_jax.convert.import_torch import import_torch
  torch_dir = str(tmp_path / "torch_fusion_llama")
  export_torch(dirs["model_dir"], torch_dir, allow_incompatible=True, log=lambda _: None)
  logs = []
  import_torch(torch_dir, str(tmp_path / "imported"), log=logs.append)
  assert any(l.startswith("compute dtype: LLM float32, tower float32") for l in logs), logs
  m = load_model(str(tmp_path / "imported"))
  # The authors' config names no template: import picks it from the LLM (Llama -> llama_3);
  # the test model pairs the tiny Llama with phi_3 for its tokenizer.
  assert m.cfg.replace(template="phi_3") == dirs["cfg"] and os.path.isdir(m.tokenizer_path)
  _same(m.params, dirs["params"])
  run_dir = str(tmp_path / "torch_fusion_run")
  export_torch(dirs["workdir"], run_dir, step=2, allow_incompatible=True, log=lambda _: None)
  import_torch(run_dir, str(tmp_path / "imported_run"), log=lambda _: None)
  _same(load_model(str(tmp_path / "imported_run")).params, dirs["saved"][2])


def test_infer_cli_names_a_bad_prompt(dirs):
  out = subprocess.run(
      [sys.executable, "-m", "fusion_jax.infer", "--workdir", dirs["model_dir"], "--image",
       os.path.join(dirs["root"], "tok", "tokenizer.model"), "--question", "What is it?"],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("infer: error: corrupt_image"), out.stderr
