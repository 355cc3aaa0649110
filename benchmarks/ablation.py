r"""The paper's ablation at tiny scale: the main job with each FUSION mechanism switched off.

  python benchmarks/ablation.py [--workdir runs/ablation] [--steps 700] [--only no_interaction,...]

Runs experiments/smoke.py with ARG in ('', no_text_guidance, no_interaction, no_mapping_loss,
no_latents), each in its own workdir (resumable), on the same cached dataset and tokenizer, then
prints held-out accuracy per category side by side and writes <workdir>/ablation.json.
Not part of CI: one run is minutes on a laptop CPU.
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

VARIANTS = ("", "no_text_guidance", "no_interaction", "no_mapping_loss", "no_latents")


PROG = "python benchmarks/ablation.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", os.path.join(ROOT, "runs", "ablation"),
                      "where the runs go", flag_values=fv)
  flags.DEFINE_integer("steps", 0, "override num_steps (0 = the config's)", flag_values=fv)
  flags.DEFINE_list("only", [], "subset of " + ",".join(VARIANTS[1:]), flag_values=fv)


def main(args) -> int:
  variants = [v for v in VARIANTS if not args.only or v == "" or v in args.only]
  results = {}
  for v in variants:
    name = v or "full"
    wd = os.path.join(args.workdir, name)
    cmd = [sys.executable, "-m", "fusion_jax.run", "--config",
           f"experiments/smoke.py{':' + v if v else ''}", "--workdir", wd, "--noexport"]
    if args.steps:
      cmd.append(f"--config.num_steps={args.steps}")
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(wd, "summary.json")) as f:
      results[name] = json.load(f)["eval"]
  cats = sorted({c for r in results.values() for c in r}, key=lambda c: (c == "all", c))
  names = list(results)
  print("\nheld-out accuracy (chance in the last column)")
  print(f"{'category':<20}" + "".join(f"{n[:16]:>17}" for n in names) + f"{'chance':>8}")
  for c in cats:
    row = [results[n].get(c, {}).get("accuracy", float("nan")) for n in names]
    chance = next(r[c]["chance"] for r in results.values() if c in r)
    print(f"{c:<20}" + "".join(f"{a:>17.3f}" for a in row) + f"{chance:>8.3f}")
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
    json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
