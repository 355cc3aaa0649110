"""Command line: synthesize a FUSION-style Language-Driven QA dataset.

  python -m fusion_jax.synth --out DIR --num N --seed S [--categories C1,C2,...] [--size 384]
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

import json
import sys
import types
from collections.abc import Sequence

from absl import flags

from fusion_jax import cli
from fusion_jax.synth.backends import DEFAULTS, BackendConfig, BackendSpec
from fusion_jax.synth.categories import CATEGORIES
from fusion_jax.synth.pipeline import SynthConfig, synthesize
from fusion_jax.synth.sharded import RunLimits, synthesize_sharded
from fusion_jax.synth.stats import format_stats


PROG = "python -m fusion_jax.synth"


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli)."""
  def string(name: str, default: str | None, help_: str) -> None:
    flags.DEFINE_string(name, default, help_, flag_values=fv)

  def integer(name: str, default: int | None, help_: str) -> None:
    flags.DEFINE_integer(name, default, help_, flag_values=fv)

  def number(name: str, default: float, help_: str) -> None:
    flags.DEFINE_float(name, default, help_, flag_values=fv)

  def boolean(name: str, help_: str) -> None:
    flags.DEFINE_boolean(name, False, help_, flag_values=fv)

  flags.DEFINE_string("out", None, "output directory", flag_values=fv, required=True)
  flags.DEFINE_integer("num", None, "number of records to produce", flag_values=fv,
                       required=True)
  integer("seed", 0, "seed of the dataset")
  flags.DEFINE_list("categories", ["all"],
                    f"subset of: {', '.join(CATEGORIES)} (or all / alignment / instruction); "
                    "comma separated, 'Synth' prefix optional", flag_values=fv)
  integer("size", 384, "image side in pixels")
  integer("workers", 1, "worker processes")
  number("heldout", 0.1, "held-out fraction per category")
  boolean("jpeg", "JPEG images instead of PNG")
  integer("png-level", 1, "zlib level for PNG (0-9)")
  boolean("arrayrecord", "also write train/heldout .array_record files (format: records.py)")
  boolean("scenes", "also write scenes.jsonl")
  flags.DEFINE_enum("alignment-style", "qa", ["qa", "caption"],
                    "alignment categories as short QA (default) or as captions", flag_values=fv)
  string("backends", None, "JSON file naming backends per stage: {\"describer\": \"pkg.mod:Name\" "
         "or {\"path\": ..., \"kwargs\": {...}}, \"renderer\": ..., \"asker\": ..., "
         "\"filter\": ...}")
  boolean("overwrite", "replace an existing dataset in --out")
  boolean("quiet", "no progress bar")

  # resumable engine (model backends)
  boolean("sharded", "use the resumable sharded engine (implied by the options below)")
  integer("concurrency", 16, "items in flight at once")
  integer("max-items", None, "make at most N items this run")
  integer("budget-requests", None, "send at most N HTTP requests this run (retries included)")
  integer("shard-size", 1000, "items per shard file")
  integer("max-failures", 20, "stop after N failed requests in a row (server down)")
  number("progress-every", 10.0, "seconds between lines")
  number("request-timeout", 120.0, "seconds per request")
  integer("max-retries", 5, "retries per request")
  number("retry-backoff", 1.0, "first retry's wait in seconds, doubling per retry (capped at "
         "60 s)")
  string("api-key-env", "OPENAI_API_KEY", "environment variable holding the endpoints' bearer "
         "token")
  # LLM describe + ask (OpenAI-compatible chat API)
  string("llm-url", None, "e.g. http://localhost:8000/v1")
  string("llm-model", None, "served model name")
  number("llm-temperature", 0.7, "sampling temperature")
  integer("llm-max-tokens", 1024, "answer length limit")
  boolean("llm-no-json-mode", "do not send response_format=json_object (servers without it)")
  string("seed-captions", None, "caption pool (.txt one per line, or .jsonl {\"caption\": ...}); "
         "default: procedural captions per category")
  string("prompts", None, "directory of prompt files replacing fusion_jax/synth/prompts/*")
  # text-to-image (diffusers)
  string("t2i-pipeline", None, "local diffusers pipeline directory")
  string("t2i-dtype", "bfloat16", "bfloat16 | float16 | float32")
  string("t2i-device", None, "default: cuda when available")
  integer("t2i-steps", 28, "denoising steps")
  number("t2i-guidance", 3.5, "guidance scale")
  integer("t2i-resolution", None, "side the model draws at (then resized to --size); default "
          "--size")
  integer("t2i-batch", 1, "prompts per pipeline call")
  string("t2i-prompt", "{caption}", "format string with {caption}")
  # VLM filter (OpenAI-compatible chat API with images)
  string("filter-url", None, "e.g. http://localhost:8001/v1")
  string("filter-model", None, "served model name")
  integer("filter-votes", 3, "votes per question")
  integer("filter-min-yes", 2, "a question holds with >= this many yes votes of --filter-votes")
  flags.DEFINE_enum("filter-mode", "answer", ["answer", "verify"], "how the VLM is asked",
                    flag_values=fv)


def parse_args(argv: Sequence[str] | None = None) -> types.SimpleNamespace:
  """The command line's values (argv as typed after the program name)."""
  return cli.parse(define_flags, argv, PROG)


def model_backends(args: types.SimpleNamespace, backends: BackendConfig) -> BackendConfig:
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


def use_sharded(args: types.SimpleNamespace) -> bool:
  return bool(args.sharded or args.llm_url or args.t2i_pipeline or args.filter_url
              or args.max_items is not None or args.budget_requests is not None)


def config_from_args(args: types.SimpleNamespace) -> SynthConfig:
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


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(parse_args(argv))


def _run(args: types.SimpleNamespace) -> int:
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
  cli.app_main(define_flags, _run, PROG)
