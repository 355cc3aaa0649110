"""Command line: synthesize a FUSION-style Language-Driven QA dataset.

  python -m fusion_jax.synth --out DIR --num N --seed S [--categories C1,C2 ...] [--size 384]
      [--workers K] [--heldout 0.1] [--jpeg] [--arrayrecord] [--scenes]
      [--alignment-style qa|caption] [--backends backends.json] [--overwrite] [--quiet]

Model backends (docs/synth.md, "Synthesis with real models"): --llm-url/--llm-model (describe
and ask over an OpenAI-compatible chat API), --t2i-pipeline DIR (diffusers text-to-image),
--filter-url/--filter-model (a vision-language model votes on every answer). Any of them, or
--sharded / --max-items / --budget-requests, selects the resumable sharded engine
(sharded.py): a rerun of the same command continues where the last one stopped.

See fusion_jax/synth/pipeline.py for the outputs and docs/synth.md for user backends.
"""
from __future__ import annotations

import argparse
import json
import sys

from fusion_jax.synth.backends import DEFAULTS, BackendConfig, BackendSpec
from fusion_jax.synth.categories import CATEGORIES
from fusion_jax.synth.pipeline import SynthConfig, synthesize
from fusion_jax.synth.sharded import RunLimits, synthesize_sharded
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
  _add_model_args(p)
  return p.parse_args(argv)


def _add_model_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("resumable engine (model backends)")
  g.add_argument("--sharded", action="store_true",
                 help="use the resumable sharded engine (implied by the options below)")
  g.add_argument("--concurrency", type=int, default=16, help="items in flight at once")
  g.add_argument("--max-items", type=int, default=None, help="make at most N items this run")
  g.add_argument("--budget-requests", type=int, default=None,
                 help="send at most N HTTP requests this run (retries included)")
  g.add_argument("--shard-size", type=int, default=1000, help="items per shard file")
  g.add_argument("--max-failures", type=int, default=20,
                 help="stop after N failed requests in a row (server down)")
  g.add_argument("--progress-every", type=float, default=10.0, help="seconds between lines")
  g.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
  g.add_argument("--max-retries", type=int, default=5, help="retries per request")
  g.add_argument("--retry-backoff", type=float, default=1.0,
                 help="first retry's wait in seconds, doubling per retry (capped at 60 s)")
  g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                 help="environment variable holding the endpoints' bearer token")
  g = p.add_argument_group("LLM describe + ask (OpenAI-compatible chat API)")
  g.add_argument("--llm-url", default=None, help="e.g. http://localhost:8000/v1")
  g.add_argument("--llm-model", default=None, help="served model name")
  g.add_argument("--llm-temperature", type=float, default=0.7)
  g.add_argument("--llm-max-tokens", type=int, default=1024)
  g.add_argument("--llm-no-json-mode", action="store_true",
                 help="do not send response_format=json_object (servers without it)")
  g.add_argument("--seed-captions", default=None,
                 help="caption pool (.txt one per line, or .jsonl {\"caption\": ...}); "
                      "default: procedural captions per category")
  g.add_argument("--prompts", default=None,
                 help="directory of prompt files replacing fusion_jax/synth/prompts/*")
  g = p.add_argument_group("text-to-image (diffusers)")
  g.add_argument("--t2i-pipeline", default=None, help="local diffusers pipeline directory")
  g.add_argument("--t2i-dtype", default="bfloat16", help="bfloat16 | float16 | float32")
  g.add_argument("--t2i-device", default=None, help="default: cuda when available")
  g.add_argument("--t2i-steps", type=int, default=28)
  g.add_argument("--t2i-guidance", type=float, default=3.5)
  g.add_argument("--t2i-resolution", type=int, default=None,
                 help="side the model draws at (then resized to --size); default --size")
  g.add_argument("--t2i-batch", type=int, default=1, help="prompts per pipeline call")
  g.add_argument("--t2i-prompt", default="{caption}", help="format string with {caption}")
  g = p.add_argument_group("VLM filter (OpenAI-compatible chat API with images)")
  g.add_argument("--filter-url", default=None, help="e.g. http://localhost:8001/v1")
  g.add_argument("--filter-model", default=None, help="served model name")
  g.add_argument("--filter-votes", type=int, default=3)
  g.add_argument("--filter-min-yes", type=int, default=2,
                 help="a question holds with >= this many yes votes of --filter-votes")
  g.add_argument("--filter-mode", choices=("answer", "verify"), default="answer")


def model_backends(args: argparse.Namespace, backends: BackendConfig) -> BackendConfig:
  """backends with the stages named by the model flags replaced."""
  client = {"timeout_s": args.request_timeout, "max_retries": args.max_retries,
            "backoff_s": args.retry_backoff,
            "max_concurrency": args.concurrency, "api_key_env": args.api_key_env}
  stages = backends.to_dict()
  if args.llm_url:
    if not args.llm_model:
      raise ValueError("--llm-url needs --llm-model (the model name the server serves)")
    kw = {"url": args.llm_url, "model": args.llm_model, "temperature": args.llm_temperature,
          "max_tokens": args.llm_max_tokens, "json_mode": not args.llm_no_json_mode,
          "seed_captions": args.seed_captions, "prompt_dir": args.prompts, **client}
    for stage in ("describer", "asker"):
      stages[stage] = {"path": "fusion_jax.synth.llm_backend:LLMBackend", "kwargs": kw}
  if args.t2i_pipeline:
    stages["renderer"] = {"path": "fusion_jax.synth.t2i_diffusers:DiffusersRenderer", "kwargs": {
        "pipeline": args.t2i_pipeline, "dtype": args.t2i_dtype, "device": args.t2i_device,
        "steps": args.t2i_steps, "guidance": args.t2i_guidance,
        "resolution": args.t2i_resolution, "batch_size": args.t2i_batch,
        "prompt": args.t2i_prompt}}
  if args.filter_url:
    if not args.filter_model:
      raise ValueError("--filter-url needs --filter-model (the model name the server serves)")
    stages["filter"] = {"path": "fusion_jax.synth.vlm_filter:VLMFilter", "kwargs": {
        "url": args.filter_url, "model": args.filter_model, "votes": args.filter_votes,
        "min_yes": args.filter_min_yes, "mode": args.filter_mode, "prompt_dir": args.prompts,
        "base_filter": stages["filter"], **client}}
  return BackendConfig.from_dict(stages)


def use_sharded(args: argparse.Namespace) -> bool:
  return bool(args.sharded or args.llm_url or args.t2i_pipeline or args.filter_url
              or args.max_items is not None or args.budget_requests is not None)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
  backends = BackendConfig.from_json_file(args.backends) if args.backends else BackendConfig()
  backends = model_backends(args, backends)
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
  args = parse_args(argv)
  cfg = config_from_args(args)
  if use_sharded(args):
    if args.workers > 1:
      raise ValueError("--workers applies to the procedural pipeline; the resumable engine "
                       "runs items in threads: use --concurrency")
    limits = RunLimits(concurrency=args.concurrency, max_items=args.max_items,
                       budget_requests=args.budget_requests, shard_size=args.shard_size,
                       max_errors=args.max_failures, progress_every_s=args.progress_every)
    stats = synthesize_sharded(cfg, limits)
    print(format_stats(stats))
    print(f"\n{stats['this_run']['items']} items this run in {stats['timing']['wall_s']:.1f} s "
          f"({stats['timing']['samples_per_s']:.2f} items/s), {stats['this_run']['requests']} "
          f"requests; dataset "
          f"{'complete' if stats['complete'] else 'INCOMPLETE (rerun to continue)'}")
    print(f"wrote {cfg.out}/train.json, heldout.json, stats.json, images/, shards/",
          file=sys.stderr)
    return 0
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
