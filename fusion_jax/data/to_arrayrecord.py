"""Converts LLaVA JSON / JSONL + image folders into ArrayRecord shards with embedded images.

    python -m fusion_jax.data.to_arrayrecord --mixture M.yaml --out DIR --shards K \
        [--image_root ROOT] [--seed S] [--workers P]
    python -m fusion_jax.data.to_arrayrecord --paths a.json,b.jsonl --image_root ROOT --out DIR

Pods read ArrayRecord shards from object storage instead of millions of small image files. The
mixture's sampling (all | first:N | end:N | random:N) is applied here, once, with `--seed`;
train from the shards with `paths: [DIR]` (or a mixture entry `arrayrecord_path: DIR`).

Output (K shards, records split into K contiguous, near-equal ranges of the mixture order):

    DIR/data.array_record-00000-of-000K ...   FJR1 records (format below), group_size 1
    DIR/data.array_record-0000k-of-000K.done.json   per-shard summary, written after the rename
    DIR/manifest.json                         totals, shard list, skip counts, the command

Record format (FJR1, decoded by `fusion_jax.data.sources.unpack_record`):

    b"FJR1" | uint32 little-endian J | J bytes UTF-8 JSON | image file bytes (may be empty)

The JSON is the LLaVA record unchanged plus "_source" (``file:line`` / ``file#index`` of the
original record, so skips at training time still point at the source); the image bytes are the
original file's bytes (no re-encoding). Conversion does NOT tokenize: shards are template- and
tokenizer-independent. What conversion can detect is skipped and counted (bad_json lines,
missing image files; listed in the manifest with their sources); everything else (corrupt
image bytes, bad conversations) is checked, skipped and counted by the training pipeline.

Resumable: a shard is written to ``*.tmp`` and renamed when complete, so a rerun skips every
shard whose final file (and .done.json) exists and redoes only the rest. The shard layout is a
function of the mixture, seed and K; a rerun with different ones is refused (manifest check).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import types
from collections import Counter
from collections.abc import Sequence
from typing import Any

from absl import flags

from fusion_jax import cli
from fusion_jax.data import images as images_lib
from fusion_jax.data import mixture as mixture_lib
from fusion_jax.data import sources as sources_lib
from fusion_jax.data.errors import BadSample

SHARD_PREFIX = "data.array_record"
MANIFEST = "manifest.json"
_MAX_LISTED_SKIPS = 1000


def shard_name(k: int, num_shards: int) -> str:
  return f"{SHARD_PREFIX}-{k:05d}-of-{num_shards:05d}"


def shard_ranges(n: int, num_shards: int) -> list[tuple[int, int]]:
  """K contiguous, near-equal [start, end) ranges covering range(n)."""
  return [(n * k // num_shards, n * (k + 1) // num_shards) for k in range(num_shards)]


def _image_bytes(raw: sources_lib.RawSample, record: dict) -> bytes:
  """Bytes of the record's image; BadSample('missing_image') if the file cannot be read,
  BadSample('image_outside_root') if its path leaves the image root."""
  if raw.image_bytes is not None:
    return raw.image_bytes
  # Confined to the image root like the training pipeline (absolute / escaping paths skipped).
  path = images_lib.resolve_image_path(record["image"], raw.image_root, source=raw.source)
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadSample("missing_image", f"{path}: {e.strerror or e}", raw.source) from None


def _build_source(args: types.SimpleNamespace):
  if args.mixture:
    return mixture_lib.load_mixture(args.mixture, seed=args.seed, image_root=args.image_root)
  return mixture_lib.source_from_paths(args.paths, args.image_root)


def write_shard(source, k: int, num_shards: int, out_dir: str, *, progress: bool = False,
                position: int = 0) -> dict[str, Any]:
  """Writes shard k (to .tmp, then renamed); returns its summary (records, skips)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  start, end = shard_ranges(len(source), num_shards)[k]
  final = os.path.join(out_dir, shard_name(k, num_shards))
  tmp = final + ".tmp"
  skips: Counter[str] = Counter()
  listed: list[dict[str, str]] = []
  written = 0
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=end - start, desc=f"shard {k}", position=position, leave=False,
               unit="rec", file=sys.stderr)
  writer = ArrayRecordWriter(tmp, "group_size:1")
  try:
    for i in range(start, end):
      raw = source[i]
      try:
        rec = sources_lib.parse_record(raw)
        img = _image_bytes(raw, rec) if rec.get("image") else b""
      except BadSample as e:
        skips[e.reason] += 1
        if len(listed) < _MAX_LISTED_SKIPS:
          listed.append({"reason": e.reason, "source": e.source or raw.source, "message": str(e)})
        continue
      finally:
        if bar is not None:
          bar.update(1)
      writer.write(sources_lib.pack_record(rec, img, raw.source))
      written += 1
  finally:
    writer.close()
    if bar is not None:
      bar.close()
  os.replace(tmp, final)
  summary = {"shard": os.path.basename(final), "records": written, "range": [start, end],
             "skipped": dict(skips), "skipped_examples": listed}
  with open(final + ".done.json", "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _shard_done(out_dir: str, k: int, num_shards: int) -> bool:
  final = os.path.join(out_dir, shard_name(k, num_shards))
  return os.path.isfile(final) and os.path.isfile(final + ".done.json")


_WORKER_SOURCE = None


def _worker_init(args: types.SimpleNamespace) -> None:
  global _WORKER_SOURCE
  _WORKER_SOURCE = _build_source(args)


def _worker_write(job: tuple[int, int, str, bool]) -> dict[str, Any]:
  k, num_shards, out_dir, progress = job
  return write_shard(_WORKER_SOURCE, k, num_shards, out_dir, progress=progress,
                     position=k % 8)


def convert(args: types.SimpleNamespace) -> dict[str, Any]:
  """Runs a conversion; returns the manifest dict (also written to DIR/manifest.json)."""
  if args.shards <= 0:
    raise ValueError("--shards must be > 0")
  os.makedirs(args.out, exist_ok=True)
  source = _build_source(args)
  n = len(source)
  config = {"mixture": os.path.abspath(args.mixture) if args.mixture else "",
            "paths": [os.path.abspath(p) for p in args.paths or []],
            "seed": args.seed, "shards": args.shards, "records_in": n, "format": "FJR1"}
  mpath = os.path.join(args.out, MANIFEST)
  if os.path.isfile(mpath):
    with open(mpath) as f:
      old = json.load(f).get("config", {})
    if old and old != config:
      raise ValueError(f"{args.out} holds shards of another conversion ({old}); "
                       f"this one is {config}. Use a new --out directory.")
  with open(mpath, "w") as f:  # config first, so an interrupted run is recognised on resume
    json.dump({"config": config, "complete": False}, f, indent=1)

  todo = [k for k in range(args.shards) if not _shard_done(args.out, k, args.shards)]
  print(f"to_arrayrecord: {n} records -> {args.shards} shards in {args.out}; "
        f"{args.shards - len(todo)} already complete, {len(todo)} to write", file=sys.stderr)
  t0 = time.time()
  progress = not args.no_progress
  if args.workers > 1 and len(todo) > 1:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(args.workers, len(todo)), initializer=_worker_init,
                  initargs=(args,)) as pool:
      for s in pool.imap_unordered(_worker_write,
                                   [(k, args.shards, args.out, progress) for k in todo]):
        print(f"  {s['shard']}: {s['records']} records, skipped {s['skipped']}", file=sys.stderr)
  else:
    for k in todo:
      s = write_shard(source, k, args.shards, args.out, progress=progress)
      print(f"  {s['shard']}: {s['records']} records, skipped {s['skipped']}", file=sys.stderr)

  shards, total, skipped, examples = [], 0, Counter(), []
  for k in range(args.shards):
    final = os.path.join(args.out, shard_name(k, args.shards))
    with open(final + ".done.json") as f:
      s = json.load(f)
    shards.append(s["shard"])
    total += s["records"]
    skipped.update(s["skipped"])
    examples.extend(s["skipped_examples"][:max(0, _MAX_LISTED_SKIPS - len(examples))])
  manifest = {"config": config, "complete": True, "records": total, "shards": shards,
              "skipped": dict(skipped), "skipped_examples": examples,
              "seconds": round(time.time() - t0, 3)}
  with open(mpath, "w") as f:
    json.dump(manifest, f, indent=1)
  print(f"to_arrayrecord: wrote {total} records, skipped {dict(skipped)} "
        f"(details in {mpath})", file=sys.stderr)
  return manifest


PROG = "python -m fusion_jax.data.to_arrayrecord"


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli); exactly one of --mixture / --paths."""
  flags.DEFINE_string("mixture", None, "mixture YAML (authors' format)", flag_values=fv)
  flags.DEFINE_list("paths", None, "LLaVA .json / .jsonl files, comma-separated (all records)",
                    flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(["mixture", "paths"], required=True, flag_values=fv)
  flags.DEFINE_string("image_root", "", "root of relative image paths", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory", flag_values=fv, required=True)
  flags.DEFINE_integer("shards", 64, "number of shards K", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of random:N mixture sampling", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "processes writing shards in parallel", flag_values=fv)
  flags.DEFINE_boolean("no_progress", False, "no progress bars", flag_values=fv)


def _run(args: types.SimpleNamespace) -> int:
  args.mixture, args.paths = args.mixture or "", args.paths or []
  try:
    convert(args)
  except (sources_lib.MixtureError, ValueError) as e:
    print(f"to_arrayrecord: error: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(cli.parse(define_flags, argv, PROG))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG)
