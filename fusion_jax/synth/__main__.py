"""Command line: synthesize a FUSION-style Language-Driven QA dataset.

  python -m fusion_jax.synth --out DIR --num N --seed S [--categories C1,C2 ...] [--size 384]
      [--workers K] [--heldout 0.1] [--jpeg] [--arrayrecord] [--scenes]
      [--alignment-style qa|caption] [--backends backends.json] [--overwrite] [--quiet]

See fusion_jax/synth/pipeline.py for the outputs and docs/synth.md for user backends.
"""
from __future__ import annotations

import argparse
import json
import sys

from fusion_jax.synth.backends import DEFAULTS, BackendConfig, BackendSpec
from fusion_jax.synth.categories import CATEGORIES
from fusion_jax.synth.pipeline import SynthConfig, synthesize
from fusion_jax.synth.stats import format_stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m fusion_jax.synth", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--num", type=int, required=True, help="number of records to produce")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--categories", nargs="+", default=["all"],
                 help=f"subset of: {', '.join(CATEGORIES)} (or all / alignment / instruction); "
                      "space or comma separated, 'Synth' prefix optional")
  p.add_argument("--size", type=int, default=384, help="image side in pixels")
  p.add_argument("--workers", type=int, default=1, help="worker processes")
  p.add_argument("--heldout", type=float, default=0.1, help="held-out fraction per category")
  p.add_argument("--jpeg", action="store_true", help="JPEG images instead of PNG")
  p.add_argument("--png-level", type=int, default=1, help="zlib level for PNG (0-9)")
  p.add_argument("--arrayrecord", action="store_true",
                 help="also write train/heldout .array_record files (format: records.py)")
  p.add_argument("--scenes", action="store_true", help="also write scenes.jsonl")
  p.add_argument("--alignment-style", choices=("qa", "caption"), default="qa",
                 help="alignment categories as short QA (default) or as captions")
  p.add_argument("--backends", default=None,
                 help="JSON file naming backends per stage: {\"describer\": \"pkg.mod:Name\" or "
                      "{\"path\": ..., \"kwargs\": {...}}, \"renderer\": ..., \"asker\": ..., "
                      "\"filter\": ...}")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
  backends = BackendConfig.from_json_file(args.backends) if args.backends else BackendConfig()
  if args.alignment_style != "qa":
    if backends.asker.path != DEFAULTS["asker"]:
      raise ValueError("--alignment-style applies to the procedural asker only; set it in the "
                       "--backends file for other askers")
    kwargs = dict(backends.asker.kwargs)
    kwargs["alignment_style"] = args.alignment_style
    backends = BackendConfig(backends.describer, backends.renderer,
                             BackendSpec(backends.asker.path, tuple(sorted(kwargs.items()))),
                             backends.filter)
  return SynthConfig(out=args.out, num=args.num, seed=args.seed,
                     categories=tuple(args.categories), size=args.size, workers=args.workers,
                     heldout_fraction=args.heldout, image_format="jpeg" if args.jpeg else "png",
                     png_level=args.png_level, arrayrecord=args.arrayrecord,
                     write_scenes=args.scenes, backends=backends, progress=not args.quiet,
                     overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
  cfg = config_from_args(parse_args(argv))
  stats = synthesize(cfg)
  print(format_stats(stats))
  t = stats["timing"]
  print(f"\n{stats['generated']} items in {t['wall_s']:.1f} s: {t['samples_per_s']:.1f} "
        f"samples/s, {t['samples_per_s_per_worker']:.1f} per worker ({cfg.workers} workers, "
        f"{cfg.size} px)")
  print(f"wrote {cfg.out}/train.json, heldout.json, stats.json, images/", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
