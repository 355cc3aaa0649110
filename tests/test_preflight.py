"""Startup checks (fusion_jax.train.preflight): each config mistake is one line, exit status 2,
within seconds, before any model init; nothing is left behind. Mixture paths are relative to the
YAML; any model preset field and every README override can be set on the command line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from experiment_helpers import ROOT, load_experiment
from fusion_jax.train import preflight
from fusion_jax.task.fusion import FusionTask
from pipeline_fixtures import make_tokenizer, write_dataset

PREFIX = "fusion_jax.train: error: "


def _train(workdir, config: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
  t = time.time()
  proc = subprocess.run([sys.executable, "-m", "fusion_jax.train", f"--config={config}",
                         f"--workdir={workdir}", *args], capture_output=True, text=True,
                        timeout=120, env=os.environ.copy())
  return proc, time.time() - t


def _errors(proc) -> list[str]:
  """The error lines; every line of stderr mentioning an error must be one of them."""
  lines = [l for l in proc.stderr.splitlines() if l.startswith(PREFIX)]
  assert len(lines) == len([l for l in proc.stderr.splitlines() if "rror" in l]), proc.stderr
  return [l[len(PREFIX):] for l in lines]


def test_paper_config_with_placeholders_fails_in_seconds(tmp_path):
  workdir = tmp_path / "run"
  proc, seconds = _train(workdir, os.path.join(ROOT, "experiments", "fusion_3b.py:stage1_5"))
  assert proc.returncode == 2 and seconds < 15, (seconds, proc.stderr)
  errors = _errors(proc)
  keys = [e.split(":")[0] for e in errors]
  assert keys == ["config.data.mixture", "config.data.image_root", "config.data.tokenizer",
                  "config.init_from"], errors
  assert all("placeholder" in e and "experiments/fusion_3b.py or pass --config." in e
             for e in errors)
  assert "Traceback" not in proc.stderr and not workdir.exists()


def test_every_missing_file_is_one_line_and_verbose_shows_tracebacks(tmp_path):
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "run"
  args = [f"--config.data.paths={tmp_path}/missing.json",
          f"--config.data.image_root={tmp_path}/a_file",
          f"--config.data.tokenizer={tmp_path}/no_tokenizer",
          f"--config.init_from={tmp_path}/no_run", "--config.global_batch=7"]
  proc, seconds = _train(workdir, os.path.join(ROOT, "experiments", "fusion_tiny.py"), *args)
  assert proc.returncode == 2 and seconds < 15, (seconds, proc.stderr)
  errors = _errors(proc)
  assert len(errors) == 5 and "Traceback" not in proc.stderr, errors
  for part in ("config.global_batch: the microbatch of 7", f"{tmp_path}/missing.json not found",
               f"{tmp_path}/a_file is not a directory", f"{tmp_path}/no_tokenizer",
               f"config.init_from: {tmp_path}/no_run does not exist"):
    assert any(part in e for e in errors), (part, errors)
  assert not workdir.exists()
  verbose, _ = _train(workdir, os.path.join(ROOT, "experiments", "fusion_tiny.py"), *args,
                      "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert not workdir.exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  make_tokenizer(root)  # ~300 pieces + the chat tokens
  write_dataset(root, 4)
  return root


def _tiny(data_dir, **data):
  c = load_experiment("fusion_tiny")
  c.data.tokenizer = os.path.join(data_dir, "tok")
  c.data.image_root = data_dir
  c.data.update(data)
  return c


def test_good_config_passes_and_tokenizer_must_fit_the_vocabulary(data_dir, tmp_path):
  c = _tiny(data_dir, paths=os.path.join(data_dir, "data.json"))
  assert preflight.check(c, str(tmp_path / "run")) == []
  c.model.overrides.llm.vocab_size = 256
  problems = preflight.check(c, str(tmp_path / "run"))
  assert len(problems) == 1 and re.fullmatch(
      f"config.data.tokenizer: tokenizer {c.data.tokenizer} has 30[0-9] tokens but the model "
      "vocabulary is 256; set config.model.overrides.llm.vocab_size", problems[0].line)
  c.data.paths = ""
  assert any("config.data: no data" in p.line for p in preflight.check(c, str(tmp_path)))


def test_mixture_paths_resolve_against_the_yaml_folder(data_dir, tmp_path, monkeypatch):
  """Not against the working directory: the same YAML means the same files from anywhere."""
  mix_dir = tmp_path / "mixes"
  mix_dir.mkdir()
  write_dataset(str(mix_dir), 3, name="part.jsonl")
  (mix_dir / "mix.yaml").write_text(
      "datasets:\n  - json_path: part.jsonl\n    image_root: .\n"
      "  - json_path: cwd_only.json\n")
  monkeypatch.chdir(tmp_path)
  write_dataset(str(tmp_path), 2, name="cwd_only.json")  # in the working directory only
  c = _tiny(data_dir, mixture=str(mix_dir / "mix.yaml"))
  lines = [p.line for p in preflight.check(c, str(tmp_path / "run"))]
  assert len(lines) == 1 and "datasets[1]: json_path 'cwd_only.json' not found" in lines[0]
  assert str(mix_dir / "cwd_only.json") in lines[0]
  (mix_dir / "mix.yaml").write_text("datasets:\n  - json_path: part.jsonl\n    image_root: .\n")
  assert preflight.check(c, str(tmp_path / "run")) == []
  from fusion_jax.data.mixture import parse_mixture
  entry, = parse_mixture("mixes/mix.yaml", image_root="config_root")
  assert (entry.path, entry.image_root) == (str(mix_dir / "part.jsonl"), str(mix_dir))
  # The config's own image_root is not the YAML's to resolve.
  (mix_dir / "mix.yaml").write_text("datasets:\n  - json_path: part.jsonl\n")
  entry, = parse_mixture("mixes/mix.yaml", image_root="config_root")
  assert entry.image_root == "config_root"


def _parse(config: str, *overrides: str):
  """The config as `python -m fusion_jax.train --config CONFIG --config.K=V ...` parses it."""
  argv = ["prog", f"--config={config}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_any_model_preset_field_can_be_overridden():
  c = _parse(os.path.join(ROOT, "experiments", "fusion_tiny.py"),
             "--config.model.overrides.vision.image_size=64",
             "--config.model.overrides.llm.rms_norm_eps=1e-6",
             "--config.model.overrides.mapping_weight=0.5",
             "--config.model.overrides.query_len=(1,4,16)")
  cfg = FusionTask(c).cfg
  assert (cfg.vision.image_size, cfg.llm.rms_norm_eps, cfg.mapping_weight) == (64, 1e-6, 0.5)
  assert cfg.query_len == (1, 4, 16)
  # The file's own overrides and the trainer's compute dtype still apply; the rest is the preset.
  assert (cfg.llm.num_layers, cfg.vision.num_layers, cfg.llm.vocab_size) == (2, 2, 320)
  assert cfg.llm.dtype == cfg.vision.dtype == "float32"
  from fusion_jax.models.presets import TINY
  assert (cfg.window_size, cfg.vision.patch_size) == (TINY.window_size, TINY.vision.patch_size)


def _readme_training_overrides() -> list[str]:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text[text.index("## Training"):text.index("## Evaluation")]
  return sorted(set(re.findall(r"--config\.[a-z_.]+=[^\s`)]+", section)))


@pytest.mark.parametrize("config", [
    "fusion_3b.py:stage1", "fusion_8b.py:stage1_5", "fusion_x_3b.py:stage2",
    "fusion_x_8b.py:stage2", "fusion_tiny.py", "smoke.py", "toy.py"])
def test_readme_training_overrides_apply_to_every_config(config):
  """README's Training section overrides; `data.*` / `model.*` are for the FUSION configs (the
  README says so), the toy task has neither data files nor a model preset."""
  overrides = _readme_training_overrides()
  assert "--config.data.mixture=/data/mix.yaml" in overrides and len(overrides) >= 6
  if config == "toy.py":
    overrides = [o for o in overrides if not o.startswith(("--config.data.", "--config.model."))]
  c = _parse(os.path.join(ROOT, "experiments", config), *overrides)
  assert c.num_steps == 100
