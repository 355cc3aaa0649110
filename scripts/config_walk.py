r"""Where the main job's config is read: its walk through the code, without training.

  python scripts/config_walk.py            # (~10-30 s on CPU; the first run synthesizes)
  python scripts/config_walk.py --places   # every place in order
  python scripts/config_walk.py --stage_walk  # one stage's trainer set-up, place by place

Runs experiments/smoke.py:short (the CI main job) through everything before the first train
step: the job's preflight, its data + tokenizer preparation, the stage plan, each stage's
preflight, then per stage the trainer set-up (task, loop.setup, the host DataConfig, the data
iterator). Every read of a ConfigDict (attribute, item, get, `in`, to_dict, items, ...) is
recorded with the repository function that made it. The walk is the list of places
(file:function) with consecutive repeats merged; a "return" is a place in a file the walk has
already left once. Prints the walk's length, its returns and the distinct files, then the
same per phase (job preflight, preparation, stage plan, stage preflights, each stage's trainer
set-up) at two levels: function (file:function places; a return revisits a function the walk
has left) and file (consecutive places in one file merged; a return revisits a file).

To measure an older commit, run this script from an archive of it (the code it walks is the
one beside the script; the first output line names the fusion_jax that was imported):

  git archive COMMIT | tar -x -C /tmp/old && cp scripts/config_walk.py /tmp/old/scripts/
  cp -n fusion_jax/cli.py /tmp/old/fusion_jax/   # its flags; commits before cli.py lack it
  cd /tmp/old && PYTHONPATH=/tmp/old python scripts/config_walk.py
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from fusion_jax import cli  # noqa: E402

PROG = "python scripts/config_walk.py"

_ML = os.path.dirname(config_dict.__file__)
_SELF = os.path.abspath(__file__)
READS: list[str] = []
# (phase name, index into READS where it starts), in order; a phase ends where the next starts.
PHASES: list[tuple[str, int]] = []
_PATCHED = ("__getattr__", "__getitem__", "__contains__", "get", "to_dict", "items", "keys",
            "values", "to_json_best_effort", "copy_and_resolve_references")


def define_flags(fv: flags.FlagValues) -> None:
  # Not --verbose: the walk imports fusion_jax.run, which defines a global --verbose.
  flags.DEFINE_boolean("places", False, "print every place of the walk", flag_values=fv)
  flags.DEFINE_boolean("stage_walk", False,
                       "print every place of the first stage's trainer set-up", flag_values=fv)
  flags.DEFINE_string("cache_dir", os.path.join(tempfile.gettempdir(), "fusion_config_walk_cache"),
                      "the main job's dataset cache (config.synth.cache_dir)", flag_values=fv)


def _place() -> str | None:
  """file:function of the first repository frame above the ConfigDict method (None: the walk's
  own driver code or a read from outside the repository)."""
  f = inspect.currentframe().f_back  # the _record_wrap frame
  while f is not None:
    path = os.path.abspath(f.f_code.co_filename)
    if path == _SELF:
      if f.f_code.co_name == "_record_wrap":
        f = f.f_back
        continue
      return None
    if path.startswith(ROOT) and "/.venv/" not in path and not path.startswith(_ML):
      # Comprehensions and lambdas count as the function that holds them.
      name = getattr(f.f_code, "co_qualname", f.f_code.co_name).split(".<locals>")[0]
      return f"{os.path.relpath(path, ROOT)}:{name}"
    f = f.f_back
  return None


def _depth_guard():
  busy = [False]

  def wrap(method):
    def _record_wrap(self, *args, **kwargs):
      if not busy[0]:
        busy[0] = True
        try:
          place = _place()
        finally:
          busy[0] = False
        if place is not None:
          READS.append(place)
      return method(self, *args, **kwargs)
    return _record_wrap
  return wrap


def install() -> None:
  wrap = _depth_guard()
  for name in _PATCHED:
    for cls in (config_dict.ConfigDict, config_dict.FrozenConfigDict):
      if name in cls.__dict__:
        setattr(cls, name, wrap(cls.__dict__[name]))


def phase(name: str) -> None:
  """Marks the start of a phase of the walk (its reads are READS from here on)."""
  PHASES.append((name, len(READS)))


def phase_reads() -> list[tuple[str, list[str]]]:
  """[(phase name, its reads)] in order."""
  ends = [start for _, start in PHASES[1:]] + [len(READS)]
  return [(name, READS[start:end]) for (name, start), end in zip(PHASES, ends)]


def levels(reads: list[str]) -> dict[str, tuple[list[str], int]]:
  """{'function' | 'file': (places with consecutive repeats merged, returns)}: a return is a
  place whose key (file:function, or file) the walk has already left once."""
  out = {}
  for level, key in (("function", lambda r: r), ("file", lambda r: r.split(":")[0])):
    places: list[str] = []
    for r in reads:
      if not places or places[-1] != key(r):
        places.append(key(r))
    left: set[str] = set()
    returns = 0
    for prev, cur in zip(places, places[1:]):
      left.add(prev)
      returns += cur in left
    out[level] = (places, returns)
  return out


def walk(reads: list[str]) -> tuple[list[str], int, int]:
  """(places with consecutive repeats merged, returns to files already left, distinct files)."""
  places: list[str] = []
  for r in reads:
    if not places or places[-1] != r:
      places.append(r)
  left: set[str] = set()
  returns = 0
  for prev, cur in zip([None] + places[:-1], places):
    f_prev = prev.split(":")[0] if prev else None
    f_cur = cur.split(":")[0]
    if f_prev is not None and f_prev != f_cur:
      left.add(f_prev)
      if f_cur in left:
        returns += 1
  return places, returns, len({p.split(":")[0] for p in places})


def drive(cache_dir: str, workdir: str) -> None:
  """The main job up to its first train step (fusion_jax.run.run's order)."""
  from experiments import smoke
  from fusion_jax import run as run_lib
  from fusion_jax.train import loop, preflight

  config = smoke.get_config("short")
  config.synth.cache_dir = cache_dir
  install()
  phase("job preflight")
  preflight.require(config, workdir, data=False, init_from=False)
  phase("prepare (data + tokenizer)")
  config = run_lib.prepare(config, workdir)
  phase("stage plan")
  plan = run_lib.stage_plan(config, workdir)
  phase("stage preflights")
  problems = [p for i, (_, c, d) in enumerate(plan)
              for p in preflight.check(c, d, init_from=i == 0)]
  if problems:
    raise preflight.ConfigError(problems)
  for name, stage_config, _ in plan:
    # loop.train's set-up: from its entry (loop.setup) to the data iterator.
    phase(f"stage {name}: trainer set-up")
    su = loop.setup(stage_config)
    su.task.make_data_iterator(0, 1)


def main(a) -> int:
  import fusion_jax
  where = os.path.dirname(os.path.abspath(fusion_jax.__file__))
  print(f"fusion_jax from {where}")
  if not where.startswith(ROOT + os.sep):
    print(f"error: fusion_jax is imported from {where}, not from {ROOT} (the code beside this "
          f"script); run with PYTHONPATH={ROOT}", file=sys.stderr)
    return 2
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    drive(a.cache_dir, os.path.join(tmp, "run"))
  places, returns, files = walk(READS)
  if a.places:
    for i, p in enumerate(places):
      print(f"{i:4d} {p}")
  print(f"config reads {len(READS)}; walk: {len(places)} places, {returns} returns to files "
        f"already left, {files} distinct files ({time.time() - t0:.0f} s)")
  print("per phase: reads | function level: places, returns | file level: places, returns")
  for name, reads in phase_reads():
    lv = levels(reads)
    print(f"  {name:44s} {len(reads):5d} | {len(lv['function'][0]):4d} {lv['function'][1]:4d} "
          f"| {len(lv['file'][0]):4d} {lv['file'][1]:4d}")
  stages = [(n, r) for n, r in phase_reads() if n.endswith("trainer set-up")]
  if stages:
    name, reads = stages[0]
    lv = levels(reads)
    print(f"one stage ({name}, loop.setup -> data iterator): function level "
          f"{len(lv['function'][0])} places, {lv['function'][1]} returns; file level "
          f"{len(lv['file'][0])} places, {lv['file'][1]} returns")
    if a.stage_walk:
      for i, p in enumerate(lv["function"][0]):
        print(f"{i:4d} {p}")
      print("files: " + " -> ".join(lv["file"][0]))
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
