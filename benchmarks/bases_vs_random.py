r"""The main job from the shipped tiny base models vs from random init, same budget.

  python benchmarks/bases_vs_random.py [--workdir runs/bases_vs_random] [--steps N] [--only bases]

Runs experiments/smoke.py (imports assets/tiny_bases with import_hf) and experiments/smoke.py:random
(random init, tokenizer trained on the dataset), each in its own workdir (a finished run's
summary.json is reused), then prints held-out accuracy per category with each category's target
and writes <workdir>/bases_vs_random.json. Not part of CI: each run is minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402

VARIANTS = {"bases": "experiments/smoke.py", "random": "experiments/smoke.py:random"}


PROG = "python benchmarks/bases_vs_random.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", os.path.join(ROOT, "runs", "bases_vs_random"),
                      "where the runs go", flag_values=fv)
  flags.DEFINE_integer("steps", 0, "override num_steps (0 = the config's)", flag_values=fv)
  flags.DEFINE_list("only", [], "subset of " + ",".join(VARIANTS), flag_values=fv)


def main(args) -> int:
  names = [n for n in VARIANTS if not args.only or n in args.only]
  results = {}
  for name in names:
    wd = os.path.join(args.workdir, name)
    summary = os.path.join(wd, "summary.json")
    if not os.path.isfile(summary):
      cmd = [sys.executable, "-m", "fusion_jax.run", "--config", VARIANTS[name], "--workdir", wd,
             "--noexport"]
      if args.steps:
        cmd.append(f"--config.num_steps={args.steps}")
      print(f"== {name}: {' '.join(cmd)}", flush=True)
      subprocess.run(cmd, cwd=ROOT, check=True)
    with open(summary) as f:
      s = json.load(f)
    results[name] = {"eval": s["eval"], "targets": {t["category"]: t for t in s["targets"]},
                     "wall_time_s": s["wall_time_s"]}
  cats = sorted({c for r in results.values() for c in r["eval"]})
  lines = [f"{'category':<20} " + " ".join(f"{n:>8}" for n in names) + f" {'chance':>7} "
           f"{'target':>8}"]
  for c in cats:
    first = next(r for r in results.values() if c in r["eval"])
    t = first["targets"].get(c, {})
    row = " ".join(f"{results[n]['eval'].get(c, {}).get('accuracy', float('nan')):>8.3f}"
                   + ("*" if results[n]["targets"].get(c, {}).get("met") else " ")
                   for n in names)
    lines.append(f"{c:<20} {row} {first['eval'][c]['chance']:>7.3f} {t.get('target', ''):>8}")
  lines.append("wall time (s)        " + " ".join(f"{results[n]['wall_time_s']:>8.0f} "
                                                  for n in names))
  lines.append("* = target met (SynthColor >= 0.9, every other closed category >= 2x chance)")
  print("\n".join(lines))
  with open(os.path.join(args.workdir, "bases_vs_random.json"), "w") as f:
    json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
