"""The resumable engine for model-backed synthesis: threads, shards, limits, progress.

`synthesize_sharded(cfg, RunLimits(...))` runs the same four stages per item as pipeline.py
(`make_item`, same per-item seeds and categories), but for backends that wait on servers or
accelerators (LLMBackend, DiffusersRenderer, VLMFilter):

  concurrency  items in flight at once (threads; requests per endpoint are bounded again by each
               ChatClient, images are batched by the renderer)
  shards       every finished item is appended to <out>/shards/ at once (shards.py); a rerun
               with the same configuration skips the finished items and continues
  limits       max_items (items made by this invocation) and budget_requests (HTTP requests
               sent by this invocation, retries included; never exceeded)
  progress     one line every few seconds: items/s, kept, rejection rate and reasons, requests

Items of each category are made in index order until the category has its quota of kept items
(after the per-item filter); then dedup, balancing and the quota pick (as pipeline.py) decide
the dataset, and categories left short get more items. When a run stops early (a limit, too
many failed requests), the dataset of what is finished so far is still written and stats.json
says "complete": false; rerun the same command to go on.

A failed request (timeouts / 429 / 5xx that outlived the retries) leaves its item unfinished
(made again on the next run, not counted as a rejection); `max_errors` failures in a row stop
the run (the server is down). Rejections (malformed replies, VLM disagreement, filter reasons)
are final and counted per reason in stats.json.

Output: as pipeline.py (train.json, heldout.json, stats.json, stats.txt, images/, optional
array_record / scenes.jsonl), plus run.json (the configuration a rerun must match), shards/ and
run_log.jsonl (one line per invocation: items, requests, retries, failures, why it stopped).
images/ keeps the image of every kept item, so a larger --num can reuse them; train.json and
heldout.json list the ones in the dataset.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Mapping

from fusion_jax.synth import filter as F
from fusion_jax.synth.openai_client import METER, BudgetExhausted, RequestFailed, RequestRejected
from fusion_jax.synth.pipeline import (OUTPUTS, SynthConfig, finalize, make_item, quotas_of,
                                       select, write_splits, write_stats)
from fusion_jax.synth.rejection import MODEL_REASONS, ItemRejected
from fusion_jax.synth.shards import SHARD_DIR, ShardStore, write_atomic
from fusion_jax.synth.stats import compute_stats

MANIFEST = "run.json"
RUN_LOG = "run_log.jsonl"
MAX_INDEX_FACTOR = 20  # give up on a category after 20x its quota of items (all rejected)


@dataclasses.dataclass(frozen=True)
class RunLimits:
  """How one invocation runs (not part of the dataset's identity; may change between reruns)."""
  concurrency: int = 16
  max_items: int | None = None
  budget_requests: int | None = None
  shard_size: int = 1000
  max_errors: int = 20
  progress_every_s: float = 10.0

  def __post_init__(self):
    if self.concurrency < 1:
      raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
    for k in ("max_items", "budget_requests"):
      v = getattr(self, k)
      if v is not None and v < 0:
        raise ValueError(f"{k} must be >= 0, got {v}")


# Backend arguments that change how items are made, not what they are (may differ on a rerun).
OPERATIONAL_KWARGS = frozenset({
    "url", "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "max_concurrency",
    "api_key_env", "device", "cpu_offload", "batch_size", "max_wait_s"})


def manifest(cfg: SynthConfig, backends: Mapping[str, Any]) -> dict[str, Any]:
  """What determines each item: a rerun must match it to continue (num may grow).

  Besides the configuration, a built backend may report a `fingerprint()` of what else decides
  its output (the LLM backend: its prompt texts and caption pool).
  """
  specs = cfg.backends.to_dict()
  for spec in specs.values():
    spec["kwargs"] = {k: v for k, v in spec["kwargs"].items() if k not in OPERATIONAL_KWARGS}
  prints = {stage: b.fingerprint() for stage, b in sorted(backends.items())
            if callable(getattr(b, "fingerprint", None))}
  return {"seed": cfg.seed, "categories": list(cfg.categories), "size": cfg.size,
          "image_format": cfg.image_format, "png_level": cfg.png_level,
          "write_scenes": cfg.write_scenes, "backends": specs, "fingerprints": prints}


def _prepare(cfg: SynthConfig, backends: Mapping[str, Any]) -> None:
  path = os.path.join(cfg.out, MANIFEST)
  want = manifest(cfg, backends)
  if cfg.overwrite:
    for n in OUTPUTS + (MANIFEST, RUN_LOG, SHARD_DIR, "images"):
      p = os.path.join(cfg.out, n)
      if os.path.isdir(p):
        shutil.rmtree(p)
      elif os.path.exists(p):
        os.remove(p)
  elif os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
      raise ValueError(f"{cfg.out} holds a run with another configuration (differs in: "
                       f"{', '.join(diff)}; see {path}); rerun with the same settings to "
                       "continue it, or pass --overwrite to start over")
  elif os.path.exists(os.path.join(cfg.out, "train.json")):
    raise FileExistsError(f"{cfg.out} already holds a dataset made without shards; pass "
                          "--overwrite to replace it")
  os.makedirs(os.path.join(cfg.out, "images"), exist_ok=True)
  with open(path, "w") as f:
    json.dump(want, f, indent=1, sort_keys=True)
    f.write("\n")


class Progress:
  """The progress line: items/s, kept, rejection rate and top reasons, requests."""

  def __init__(self, enabled: bool, every_s: float):
    self.enabled, self.every_s = enabled, every_s
    self.t0 = self.last = time.perf_counter()

  def line(self, made: int, kept: int, need: int, rejected: Mapping[str, int],
           failed: int) -> str:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    n_rej = sum(rejected.values())
    top = ", ".join(f"{k} {v}" for k, v in collections.Counter(rejected).most_common(3))
    m = METER.snapshot()
    budget = f"/{m['budget']}" if m["budget"] is not None else ""
    return (f"synth: {made} items this run ({made / dt:.2f} items/s), kept {kept}/{need}, "
            f"rejected {100.0 * n_rej / max(made, 1):.1f}%{f' ({top})' if top else ''}, "
            f"{m['requests']}{budget} requests ({sum(m['retries'].values())} retries), "
            f"{failed} failed")

  def maybe(self, *args: Any, force: bool = False) -> None:
    now = time.perf_counter()
    if self.enabled and (force or now - self.last >= self.every_s):
      self.last = now
      print(self.line(*args), file=sys.stderr, flush=True)


def _run_item(index: int, cfg: SynthConfig, backends: Mapping[str, Any]) -> dict[str, Any]:
  """make_item, with a backend's ItemRejected / RequestRejected turned into a reason."""
  try:
    return make_item(index, cfg, backends)
  except ItemRejected as e:
    reason = e.reason
  except RequestRejected:
    reason = "request_rejected"
  return {"index": index, "category": cfg.categories[index % len(cfg.categories)],
          "reason": reason}


def synthesize_sharded(cfg: SynthConfig, limits: RunLimits = RunLimits()) -> dict[str, Any]:
  """Make (or continue) the dataset of cfg in cfg.out; returns the stats dict (also written)."""
  backends = cfg.backends.build()
  _prepare(cfg, backends)
  store = ShardStore(cfg.out, limits.shard_size)
  done = store.load()
  quotas = quotas_of(cfg)
  ncat = len(cfg.categories)
  cats = cfg.categories
  kept = collections.Counter(e["category"] for e in done.values() if e.get("reason") is None)
  target = dict(quotas)
  cursor = {c: k for k, c in enumerate(cats)}  # next index to consider per category
  limit = {c: MAX_INDEX_FACTOR * quotas[c] * ncat + ncat for c in cats}
  exhausted: set[str] = set()
  inflight: dict[cf.Future, tuple[int, str]] = {}
  inflight_cat: collections.Counter = collections.Counter()
  made = failed = failed_in_row = 0
  run_rejected: collections.Counter = collections.Counter()
  failures: collections.Counter = collections.Counter()
  stopped = None
  METER.reset(limits.budget_requests)
  progress = Progress(cfg.progress, limits.progress_every_s)
  pool = cf.ThreadPoolExecutor(limits.concurrency, thread_name_prefix="synth")

  def next_index(c: str) -> int | None:
    i = cursor[c]
    while i in done:
      i += ncat
    cursor[c] = i
    return i if i < limit[c] else None

  try:
    while True:
      while stopped is None and len(inflight) < limits.concurrency:
        need = [c for c in cats if c not in exhausted and kept[c] + inflight_cat[c] < target[c]]
        if not need:
          break
        if limits.max_items is not None and made + len(inflight) >= limits.max_items:
          stopped = f"max_items ({limits.max_items})"
          break
        if METER.exhausted():
          stopped = f"budget_requests ({limits.budget_requests})"
          break
        c = min(need, key=lambda c: cursor[c])
        i = next_index(c)
        if i is None:
          exhausted.add(c)
          continue
        cursor[c] = i + ncat
        inflight[pool.submit(_run_item, i, cfg, backends)] = (i, c)
        inflight_cat[c] += 1
      if not inflight:
        if stopped is not None:
          break
        records = [e["record"] for e in done.values() if e.get("reason") is None]
        selected, _, _ = select(records, quotas)
        short = {c: quotas[c] - len(selected[c]) for c in cats
                 if len(selected[c]) < quotas[c] and c not in exhausted}
        if not short:
          break
        for c, n in short.items():  # dedup / balancing dropped some: make more
          target[c] = kept[c] + math.ceil(n * 1.3 + 2)
        continue
      finished, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
      for fut in finished:
        i, c = inflight.pop(fut)
        inflight_cat[c] -= 1
        try:
          res = fut.result()
        except BudgetExhausted:
          stopped = f"budget_requests ({limits.budget_requests})"
          continue
        except RequestFailed as e:
          failed += 1
          failed_in_row += 1
          failures[e.reason] += 1
          if failed_in_row >= limits.max_errors:
            stopped = f"{failed_in_row} failed requests in a row (last: {e})"
          continue
        failed_in_row = 0
        made += 1
        entry: dict[str, Any] = {"index": i, "category": c, "reason": res["reason"]}
        if res["reason"] is None:
          rec = res["record"]
          write_atomic(os.path.join(cfg.out, rec["image"]), res["image_bytes"])
          entry["record"] = rec
          if cfg.write_scenes:
            entry["scene"] = res["scene"]
          kept[c] += 1
        else:
          run_rejected[res["reason"]] += 1
        store.append(entry)
        done[i] = entry
      progress.maybe(made, sum(kept.values()), cfg.num, run_rejected, failed)
  except BaseException:
    pool.shutdown(wait=True, cancel_futures=True)
    store.close()
    raise
  pool.shutdown(wait=True)
  store.close()
  progress.maybe(made, sum(kept.values()), cfg.num, run_rejected, failed, force=True)
  stats = _finish(cfg, done, quotas, exhausted, stopped)
  log = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "items": made,
         "rejected": dict(sorted(run_rejected.items())), "failed": dict(sorted(failures.items())),
         "wall_s": round(time.perf_counter() - progress.t0, 3), "stopped": stopped,
         **METER.snapshot()}
  with open(os.path.join(cfg.out, RUN_LOG), "a") as f:
    f.write(json.dumps(log, sort_keys=True) + "\n")
  stats["timing"] = {"wall_s": log["wall_s"],
                     "samples_per_s": round(made / max(log["wall_s"], 1e-9), 2),
                     "samples_per_s_per_worker": round(made / max(log["wall_s"], 1e-9), 2)}
  stats["this_run"] = log
  return stats


def _finish(cfg: SynthConfig, done: Mapping[int, Mapping[str, Any]], quotas: Mapping[str, int],
            exhausted: set[str], stopped: str | None) -> dict[str, Any]:
  """Select, split and write the dataset of the finished items; returns the stats."""
  entries = [done[i] for i in sorted(done)]
  records = [e["record"] for e in entries if e.get("reason") is None]
  rejected: collections.Counter = collections.Counter()
  rejected_by_cat: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for e in entries:
    if e.get("reason") is not None:
      rejected[e["reason"]] += 1
      rejected_by_cat[e["category"]][e["reason"]] += 1
  final, selected = finalize(cfg, records, quotas, rejected, rejected_by_cat)
  scenes = {e["record"]["id"]: e.get("scene") for e in entries if e.get("reason") is None}
  train, heldout = write_splits(cfg, final, scenes)
  stats = compute_stats(cfg, train, heldout, len(entries), rejected, rejected_by_cat, quotas)
  reasons = list(F.REASONS) + [r for r in MODEL_REASONS if r not in F.REASONS]
  reasons += sorted(set(rejected) - set(reasons))
  stats["rejected"] = {k: int(rejected.get(k, 0)) for k in reasons}
  stats["unused_surplus"] = len(entries) - sum(rejected.values()) - len(final)
  short = {c: f"{len(selected[c])}/{quotas[c]}" for c in quotas if len(selected[c]) < quotas[c]}
  stats["complete"] = not short
  if short:
    why = stopped or ("too many rejections (" + ", ".join(sorted(exhausted)) + ")"
                      if exhausted else "stopped")
    stats["incomplete"] = {"short (kept/quota)": short, "stopped": why}
    print(f"fusion_jax.synth: dataset incomplete, short of quota (kept/quota): {short}; "
          f"stopped by {why}. Rerun the same command to continue.", file=sys.stderr)
  write_stats(cfg, stats)
  return stats
