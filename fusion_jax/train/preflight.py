"""Startup checks: the mistakes a config can hold, found before any model init or compile.

  problems = preflight.check(config, workdir)        # [] when the run can start
  preflight.require(config, workdir)                 # raises ConfigError listing them all
  sys.exit(preflight.report(error, "fusion_jax.train", verbose))  # one line each, status 2

Checked, each problem one line naming the config key, the value and the fix:
  the common trainer fields (train.config.validate_config) against this host's devices;
  placeholder paths (/path/to/..., YOUR_BUCKET) by name, without touching the network;
  for the fusion task: the model (preset + overrides), the data config, the data source (every
  file of data.paths, the mixture YAML and every file it lists, tfds_data_dir), image_root, the
  tokenizer and its size against the model vocabulary, and init_from (skipped when the workdir
  already holds a checkpoint: a resume does not read it).
Nothing is created, so a failed check leaves no folder behind.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

# Values the experiment files ship with, to be replaced by the user.
PLACEHOLDER = re.compile(r"/path/to/|YOUR_[A-Z_]+")
# What a bad value raises in the checks below (anything else is a bug: its traceback shows).
_EXPECTED = (ValueError, KeyError, TypeError, OSError)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One configuration mistake: a message, and the exception behind it (for --verbose)."""
  message: str
  error: BaseException | None = None

  @property
  def line(self) -> str:
    return " ".join(self.message.split())


class ConfigError(ValueError):
  """Every problem preflight found (str: one line each)."""

  def __init__(self, problems: Sequence[Problem]):
    self.problems = list(problems)
    super().__init__("\n".join(p.line for p in self.problems))


def _message(e: BaseException) -> str:
  # KeyError's str() is the repr of its argument; the others' is the message.
  return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


class _Checks:
  """Collects problems; `run` turns an expected exception into one."""

  def __init__(self, config_file: str):
    self.problems: list[Problem] = []
    self.config_file = re.sub(r"(\.py):[^/]*$", r"\1", config_file)  # without its :ARG

  def add(self, message: str, error: BaseException | None = None) -> None:
    self.problems.append(Problem(message, error))

  def run(self, prefix: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None after recording its error (prefixed unless it names the key)."""
    try:
      return fn(*args)
    except _EXPECTED as e:
      msg = _message(e)
      self.add(msg if msg.startswith(("config.", prefix)) else f"{prefix}: {msg}", e)
      return None

  def usable_path(self, key: str, value: str) -> bool:
    """False (and a problem) when `value` is a placeholder left from the experiment file."""
    if PLACEHOLDER.search(value):
      where = f"edit {self.config_file} or pass" if self.config_file else "pass"
      self.add(f"config.{key}: {value!r} is a placeholder; {where} --config.{key}=<your path>")
      return False
    return True


def _exists(path: str) -> bool:
  if "://" in path:  # gs:// and friends: through epath (the same library orbax reads with)
    from etils import epath
    return epath.Path(path).exists()
  return os.path.exists(path)


def _has_checkpoint(workdir: str) -> bool:
  from fusion_jax.train import checkpoint as ckpt_lib
  root = ckpt_lib.checkpoint_dir(workdir)
  return _exists(root) and bool(ckpt_lib.finalized_steps(root))


def _check_init_from(c: _Checks, path: str) -> None:
  """A model dir, a run dir, its checkpoints/ dir or one step dir with params."""
  from fusion_jax.train import checkpoint as ckpt_lib
  if not c.usable_path("init_from", path):
    return
  if not _exists(path):
    c.add(f"config.init_from: {path} does not exist; give a run dir, a checkpoint step dir or "
          "a model dir (python -m fusion_jax.convert.import_hf / import_torch writes one)")
    return
  from fusion_jax.convert import model_dir
  join = os.path.join
  if model_dir.is_model_dir(path) or (_exists(join(path, "params"))
                                      and os.path.basename(path.rstrip("/")).isdigit()):
    return
  for root in (join(path, ckpt_lib.CHECKPOINT_SUBDIR), path):
    if _exists(root) and ckpt_lib.finalized_steps(root):
      return
  c.add(f"config.init_from: {path} holds no complete checkpoint (expected <dir>/checkpoints/"
        "<step>/params, <dir>/<step>/params or a model dir with fusion_config.json and params/)")


def _check_paths(c: _Checks, paths: Any) -> None:
  from fusion_jax.data.sources import expand_arrayrecord_paths
  for p in ([paths] if isinstance(paths, str) else list(paths)):
    if not c.usable_path("data.paths", p):
      continue
    if p.endswith((".json", ".jsonl")):
      if not _exists(p):
        c.add(f"config.data.paths: {p} not found (a LLaVA .json / .jsonl file)")
    else:
      c.run("config.data.paths", expand_arrayrecord_paths, p)


def _check_data(c: _Checks, data: ml_collections.ConfigDict) -> None:
  """The data source, image_root: every file named exists (the model is not needed)."""
  from fusion_jax.data import mixture as mixture_lib
  paths, mixture = data.get("paths") or (), data.get("mixture") or ""
  tfds_name = data.get("tfds_name") or ""
  image_root = data.get("image_root") or ""
  if not (paths or mixture or tfds_name):
    c.add("config.data: no data; set --config.data.paths=FILE.json (or .jsonl / ArrayRecord), "
          "--config.data.mixture=MIX.yaml or --config.data.tfds_name=NAME")
  if paths:
    _check_paths(c, paths)
  if mixture and c.usable_path("data.mixture", mixture):
    # Every entry's file is resolved (relative to the YAML's folder) and must exist.
    c.run("config.data.mixture", mixture_lib.parse_mixture, mixture, image_root)
  tfds_dir = data.get("tfds_data_dir") or ""
  if tfds_name and tfds_dir and c.usable_path("data.tfds_data_dir", tfds_dir):
    if not _exists(tfds_dir):
      c.add(f"config.data.tfds_data_dir: {tfds_dir} does not exist")
  if image_root and c.usable_path("data.image_root", image_root):
    if not _exists(image_root):
      c.add(f"config.data.image_root: {image_root} does not exist; relative image paths of "
            "the records resolve against it")
    elif "://" not in image_root and not os.path.isdir(image_root):
      c.add(f"config.data.image_root: {image_root} is not a directory")


def _check_fusion(c: _Checks, config: ml_collections.ConfigDict, data: bool) -> None:
  from fusion_jax.train.fusion_task import FusionTask
  task = c.run("config.model", FusionTask, config)
  if not data:
    return
  _check_data(c, config.data)
  tok = config.data.get("tokenizer") or ""
  if task is not None and (not tok or c.usable_path("data.tokenizer", tok)):
    # Loads it once: the file exists, is a tokenizer, and fits the model vocabulary.
    c.run("config.data.tokenizer", lambda: task.tokenizer)
  if task is not None:
    import jax
    c.run("config.data", task.data_config, jax.process_count())


def check(config: ml_collections.ConfigDict, workdir: str, *, config_file: str = "",
          data: bool = True, init_from: bool = True) -> list[Problem]:
  """Every problem of `config` for a run in `workdir` ([] when it can start).

  Args:
    config_file: the experiment file, named in the hint for placeholder paths.
    data: check the data side (sources, image_root, tokenizer); off for a config whose data is
      filled in later (the main job before synthesis).
    init_from: check config.init_from (off when an earlier stage will write it).
  """
  from fusion_jax.train import config as config_lib
  c = _Checks(config_file)
  if PLACEHOLDER.search(workdir):
    c.add(f"--workdir {workdir!r} is a placeholder; give the run directory")
  elif "://" not in workdir and os.path.isfile(workdir):
    c.add(f"--workdir {workdir} is a file; give a directory (it is created if missing)")
  c.run("config", config_lib.validate_config, config)
  if config.get("task") == "fusion":
    _check_fusion(c, config, data)
  if init_from and config.get("init_from") and not (
      "://" not in workdir and _has_checkpoint(workdir)):
    _check_init_from(c, str(config.init_from))
  return c.problems


def require(config: ml_collections.ConfigDict, workdir: str, **kwargs: Any) -> None:
  """check(), raising ConfigError with every problem found."""
  problems = check(config, workdir, **kwargs)
  if problems:
    raise ConfigError(problems)


def report(error: ConfigError, prog: str, verbose: bool = False, file=None) -> int:
  """Prints one line per problem (with its traceback when verbose); returns exit status 2."""
  file = file or sys.stderr
  for p in error.problems:
    if verbose and p.error is not None:
      traceback.print_exception(p.error, file=file)
    print(f"{prog}: error: {p.line}", file=file)
  file.flush()
  return 2
