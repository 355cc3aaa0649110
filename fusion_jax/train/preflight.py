"""Startup checks: the mistakes a config can hold, found before any model init or compile.

  problems = preflight.check(config, workdir)        # [] when the run can start
  preflight.require(config, workdir)                 # raises ConfigError listing them all
  sys.exit(preflight.report(error, "fusion_jax.train", verbose))  # one line each, status 2

Checked, each problem one line naming the config key, the value and the fix:
  the common trainer fields (train.config.validate_config) against this host's devices;
  placeholder paths (/path/to/..., YOUR_BUCKET) by name, without touching the network;
  the task's own checks: `preflight(checks, config, data)` of its factory when it has one
  (FUSION: the model, the data files and the tokenizer; fusion_jax/task/preflight.py);
  init_from (skipped when the workdir already holds a checkpoint: a resume does not read it).
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


class Checks:
  """Collects problems; `run` turns an expected exception into one (task checks use it too)."""

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


def exists(path: str) -> bool:
  """Whether a local or gs:// path exists."""
  if "://" in path:  # gs:// and friends: through epath (the same library orbax reads with)
    from etils import epath
    return epath.Path(path).exists()
  return os.path.exists(path)


def _has_checkpoint(workdir: str) -> bool:
  from fusion_jax.train import checkpoint as ckpt_lib
  root = ckpt_lib.checkpoint_dir(workdir)
  return exists(root) and bool(ckpt_lib.finalized_steps(root))


def _check_init_from(c: Checks, path: str) -> None:
  """A model dir, a run dir, its checkpoints/ dir or one step dir with params."""
  from fusion_jax.train import checkpoint as ckpt_lib
  if not c.usable_path("init_from", path):
    return
  if not exists(path):
    c.add(f"config.init_from: {path} does not exist; give a run dir, a checkpoint step dir or "
          "a model dir (python -m fusion_jax.convert.import_hf / import_torch writes one)")
    return
  from fusion_jax.convert import model_dir
  join = os.path.join
  if model_dir.is_model_dir(path) or (exists(join(path, "params"))
                                      and os.path.basename(path.rstrip("/")).isdigit()):
    return
  for root in (join(path, ckpt_lib.CHECKPOINT_SUBDIR), path):
    if exists(root) and ckpt_lib.finalized_steps(root):
      return
  c.add(f"config.init_from: {path} holds no complete checkpoint (expected <dir>/checkpoints/"
        "<step>/params, <dir>/<step>/params or a model dir with fusion_config.json and params/)")


def _check_task(c: Checks, config: ml_collections.ConfigDict, data: bool) -> None:
  """The task's own checks: its factory's optional `preflight(checks, config, data)`."""
  from fusion_jax.train import task as task_lib
  if not config.get("task"):
    return  # validate_config reported it
  factory = c.run("config.task", task_lib.task_factory, config)
  task_checks = getattr(factory, "preflight", None)
  if task_checks is not None:
    task_checks(c, config, data)


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
  c = Checks(config_file)
  if PLACEHOLDER.search(workdir):
    c.add(f"--workdir {workdir!r} is a placeholder; give the run directory")
  elif "://" not in workdir and os.path.isfile(workdir):
    c.add(f"--workdir {workdir} is a file; give a directory (it is created if missing)")
  c.run("config", config_lib.validate_config, config)
  _check_task(c, config, data)
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
