"""The synthesis engine: describe -> render -> ask -> filter, in parallel, deterministic.

`synthesize(SynthConfig(...))` writes to `out`:
  images/<id>.png          one image per record (PNG by default; JPEG with image_format)
  train.json, heldout.json LLaVA records (records.py), sorted by id, one record per line
  stats.json, stats.txt    counts, filter rejections per reason, chance level and
                           majority-answer rate per category, throughput
  train.array_record, heldout.array_record   with arrayrecord=True (format: records.py)
  scenes.jsonl             with write_scenes=True: the structured description of each record

The filter's pixel checks run on the rendered array before encoding, so with JPEG images the
checked pixels are the lossless render (use PNG when exact pixels matter).

Determinism: item i of a run with seed s draws every random number from
SeedSequence(s, spawn_key=(i, stage)); category = categories[i % len(categories)]. Items are
generated in fixed-size rounds of indices until every category has its quota after filtering,
deduplication and balancing, so the output depends only on (config, seed), never on the
number of workers or their scheduling.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fusion_jax.synth import filter as F
from fusion_jax.synth.backends import BackendConfig
from fusion_jax.synth.categories import CATEGORIES, parse_categories
from fusion_jax.synth.records import build_record, encode_entry, write_arrayrecord
from fusion_jax.synth.render import encode_image
from fusion_jax.synth.stats import compute_stats, format_stats

STAGE_IDS = {"describe": 0, "render": 1, "ask": 2}
CHUNK = 16          # indices per worker task
MAX_ROUNDS = 12     # generation rounds before giving up on a category's quota
# What a finished run writes next to images/ (both engines).
OUTPUTS = ("train.json", "heldout.json", "stats.json", "stats.txt", "train.array_record",
           "heldout.array_record", "scenes.jsonl")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Everything that determines a synthesized dataset (plus how to run it)."""
  out: str
  num: int
  seed: int = 0
  categories: tuple[str, ...] = CATEGORIES
  size: int = 384
  workers: int = 1
  heldout_fraction: float = 0.1
  image_format: str = "png"     # "png" | "jpeg"
  png_level: int = 1            # zlib level of PNG images
  arrayrecord: bool = False
  write_scenes: bool = False
  backends: BackendConfig = BackendConfig()
  progress: bool = True
  overwrite: bool = False

  def __post_init__(self):
    object.__setattr__(self, "categories", parse_categories(self.categories))
    if self.num < 1:
      raise ValueError(f"SynthConfig.num must be >= 1, got {self.num}")
    if self.size < 32:
      raise ValueError(f"SynthConfig.size must be >= 32 pixels, got {self.size}")
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f"SynthConfig.heldout_fraction must be in [0, 1), got "
                       f"{self.heldout_fraction}")
    if self.image_format not in ("png", "jpeg"):
      raise ValueError(f"SynthConfig.image_format must be 'png' or 'jpeg', got "
                       f"{self.image_format!r}")


def item_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
  """Independent per-stage generators of item `index` (same for any worker count / order)."""
  return {stage: np.random.Generator(np.random.PCG64(
      np.random.SeedSequence(entropy=seed, spawn_key=(index, sid))))
          for stage, sid in STAGE_IDS.items()}


def sample_id(index: int) -> str:
  return f"synth_{index:08d}"


# ---- worker side ----

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: SynthConfig) -> None:
  _WORKER["cfg"] = cfg
  _WORKER["backends"] = cfg.backends.build()


def make_item(index: int, cfg: SynthConfig, backends: Mapping[str, Any]
              ) -> dict[str, Any]:
  """Run the four stages for one index. Returns a result dict; images are written by the
  caller only for items that pass the per-item filter."""
  category = cfg.categories[index % len(cfg.categories)]
  rngs = item_rngs(cfg.seed, index)
  desc = backends["describer"].describe(category, rngs["describe"])
  image = backends["renderer"].render(desc, cfg.size, rngs["render"])
  turns = backends["asker"].ask(desc, rngs["ask"])
  reason = backends["filter"].check(desc, turns, image)
  out: dict[str, Any] = {"index": index, "category": category, "reason": reason}
  if reason is None:
    sid = sample_id(index)
    ext = "png" if cfg.image_format == "png" else "jpg"
    out["record"] = build_record(sid, category, turns, desc.caption, f"images/{sid}.{ext}")
    out["image_bytes"] = encode_image(image, cfg.image_format, png_level=cfg.png_level)
    if cfg.write_scenes:
      out["scene"] = desc.to_dict()
  return out


def _run_chunk(indices: Sequence[int]) -> list[dict[str, Any]]:
  return [make_item(i, _WORKER["cfg"], _WORKER["backends"]) for i in indices]


# ---- dataset level ----

def stratified_take(records: Sequence[Mapping[str, Any]], quota: int
                    ) -> list[Mapping[str, Any]]:
  """`quota` records keeping each balance group's share and its answers as even as possible.

  Groups get largest-remainder shares of the quota; inside a group, records are taken
  round-robin over answers (each answer's records in index order).
  """
  if len(records) <= quota:
    return list(records)
  groups: dict[Any, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in records:
    groups[F.group_key(r)].append(r)
  keys = sorted(groups, key=repr)
  n = len(records)
  exact = {k: quota * len(groups[k]) / n for k in keys}
  alloc = {k: int(math.floor(v)) for k, v in exact.items()}
  rest = quota - sum(alloc.values())
  for k in sorted(keys, key=lambda k: (-(exact[k] - alloc[k]), repr(k)))[:rest]:
    alloc[k] += 1
  out = []
  for k in keys:
    by_answer: dict[Any, list] = collections.defaultdict(list)
    for r in groups[k]:
      q = F.primary_qa(r)
      by_answer[q["answer"] if q else None].append(r)
    order = []
    lists = [by_answer[a] for a in sorted(by_answer, key=repr)]
    for i in range(max(len(v) for v in lists)):
      order += [v[i] for v in lists if i < len(v)]
    out += order[:alloc[k]]
  return sorted(out, key=lambda r: r["id"])


def split_heldout(records: Sequence[Mapping[str, Any]], fraction: float, seed: int
                  ) -> tuple[list, list]:
  """Per category, the round(fraction * n) records with the smallest hash(seed, id) are
  held out."""
  by_cat: dict[str, list] = collections.defaultdict(list)
  for r in records:
    by_cat[r["category"]].append(r)
  held: set[str] = set()
  for recs in by_cat.values():
    ranked = sorted(recs, key=lambda r: hashlib.sha1(f"{seed}:{r['id']}".encode()).hexdigest())
    held.update(r["id"] for r in ranked[:int(round(fraction * len(recs)))])
  train = [r for r in records if r["id"] not in held]
  heldout = [r for r in records if r["id"] in held]
  if fraction > 0 and not heldout and records:
    # Still written (an empty list) so the outputs keep their shape; synth_tfds leaves the
    # empty split out. Say so now rather than when an evaluation finds nothing to score.
    sizes = sorted(len(v) for v in by_cat.values())
    need = math.floor(0.5 / fraction) + 1
    print(f"warning: the held-out split is empty: {fraction} of {sizes[0]}-{sizes[-1]} records "
          f"per category rounds to 0; to hold some out give >= {need} records per category "
          f"(--num >= {need * len(by_cat)} for {len(by_cat)} categories)", file=sys.stderr)
  return train, heldout


def dumps_records(records: Sequence[Mapping[str, Any]]) -> str:
  """A JSON list with one record per line (deterministic: sorted keys)."""
  lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
  return "[\n" + ",\n".join(lines) + "\n]\n"


def quotas_of(cfg: SynthConfig) -> dict[str, int]:
  """Records per category: cfg.num split evenly, the first categories taking the remainder."""
  c = len(cfg.categories)
  return {cat: cfg.num // c + (1 if k < cfg.num % c else 0)
          for k, cat in enumerate(cfg.categories)}


def select(pool: Sequence[Mapping[str, Any]], quotas: Mapping[str, int]
           ) -> tuple[dict[str, list], dict[str, int], dict[str, int]]:
  """Dedup + balance the pool per category: (selected, duplicates, balance drops) by category."""
  kept, n_dup = F.dedup(sorted(pool, key=lambda r: r["id"]))
  by_cat: dict[str, list] = collections.defaultdict(list)
  for r in kept:
    by_cat[r["category"]].append(r)
  selected, dup_by_cat, bal_by_cat = {}, {}, {}
  pool_by_cat = collections.Counter(r["category"] for r in pool)
  for cat, q in quotas.items():
    recs, n_bal = F.balance(by_cat.get(cat, []))
    dup_by_cat[cat] = pool_by_cat[cat] - len(by_cat.get(cat, []))
    bal_by_cat[cat] = n_bal
    selected[cat] = recs
  return selected, dup_by_cat, bal_by_cat


def finalize(cfg: SynthConfig, records: Sequence[Mapping[str, Any]], quotas: Mapping[str, int],
             rejected: collections.Counter, rejected_by_cat: Mapping[str, collections.Counter]
             ) -> tuple[list[Mapping[str, Any]], dict[str, list]]:
  """The dataset's records: `select`, each category cut to its quota (`stratified_take`),
  sorted by id; duplicate / balance drops are added to the rejection counters.
  Returns (final records, selected by category)."""
  selected, dup_by_cat, bal_by_cat = select(records, quotas)
  final = []
  for cat in cfg.categories:
    final += stratified_take(selected[cat], quotas[cat])
    for reason, n in (("duplicate", dup_by_cat[cat]), ("balance", bal_by_cat[cat])):
      if n:
        rejected[reason] += n
        rejected_by_cat[cat][reason] += n
  final.sort(key=lambda r: r["id"])
  return final, selected


def write_splits(cfg: SynthConfig, final: Sequence[Mapping[str, Any]],
                 scenes: Mapping[str, Any]) -> tuple[list, list]:
  """Splits `final` (split_heldout) and writes train / heldout .json (and .array_record with
  cfg.arrayrecord), and scenes.jsonl with cfg.write_scenes. Returns (train, heldout)."""
  train, heldout = split_heldout(final, cfg.heldout_fraction, cfg.seed)
  for name, recs in (("train", train), ("heldout", heldout)):
    with open(os.path.join(cfg.out, f"{name}.json"), "w", encoding="utf-8") as f:
      f.write(dumps_records(recs))
    if cfg.arrayrecord:
      entries = []
      for r in recs:
        with open(os.path.join(cfg.out, r["image"]), "rb") as f:
          entries.append(encode_entry(r, f.read()))
      write_arrayrecord(os.path.join(cfg.out, f"{name}.array_record"), entries)
  if cfg.write_scenes:
    with open(os.path.join(cfg.out, "scenes.jsonl"), "w", encoding="utf-8") as f:
      for r in final:
        f.write(json.dumps({"id": r["id"], "scene": scenes[r["id"]]}, sort_keys=True) + "\n")
  return train, heldout


def write_stats(cfg: SynthConfig, stats: Mapping[str, Any]) -> None:
  """stats.json (deterministic) and its table stats.txt."""
  with open(os.path.join(cfg.out, "stats.json"), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=1, sort_keys=True)
    f.write("\n")
  with open(os.path.join(cfg.out, "stats.txt"), "w", encoding="utf-8") as f:
    f.write(format_stats(stats) + "\n")


def _prepare_out(cfg: SynthConfig) -> None:
  names = ["images", *OUTPUTS]
  if os.path.isdir(cfg.out) and any(os.path.exists(os.path.join(cfg.out, n)) for n in names):
    if not cfg.overwrite:
      raise FileExistsError(f"{cfg.out} already holds a synthesized dataset; pass --overwrite "
                            "(SynthConfig.overwrite=True) to replace it")
    for n in names:
      p = os.path.join(cfg.out, n)
      if os.path.isdir(p):
        shutil.rmtree(p)
      elif os.path.exists(p):
        os.remove(p)
  os.makedirs(os.path.join(cfg.out, "images"), exist_ok=True)


def _results(cfg: SynthConfig, indices: Sequence[int], pool, backends) -> Iterable[dict]:
  chunks = [list(indices[i:i + CHUNK]) for i in range(0, len(indices), CHUNK)]
  if pool is None:
    for ch in chunks:
      yield from (make_item(i, cfg, backends) for i in ch)
  else:
    for res in pool.imap(_run_chunk, chunks):
      yield from res


def synthesize(cfg: SynthConfig) -> dict[str, Any]:
  """Generate the dataset described by cfg; returns the stats dict (also written)."""
  from tqdm import tqdm  # only the CLI / engine needs it

  _prepare_out(cfg)
  t0, cpu0 = time.perf_counter(), time.process_time()
  quotas = quotas_of(cfg)
  pool = None
  backends = None
  if cfg.workers > 1:
    ctx = multiprocessing.get_context("spawn")  # safe with threaded parents (jax, tqdm)
    pool = ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,))
  else:
    backends = cfg.backends.build()
  records: list[dict[str, Any]] = []
  scenes: dict[str, Any] = {}
  rejected: collections.Counter = collections.Counter()
  rejected_by_cat: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  generated = 0
  next_index = 0
  ncat = len(cfg.categories)
  block = ncat * math.ceil(cfg.num * 1.05 / ncat) + ncat
  bar = tqdm(total=block, desc="synth", unit="item", file=sys.stderr, disable=not cfg.progress)
  images_dir = os.path.join(cfg.out, "images")
  try:
    for _ in range(MAX_ROUNDS):
      indices = list(range(next_index, next_index + block))
      next_index += block
      for res in _results(cfg, indices, pool, backends):
        generated += 1
        bar.update(1)
        if res["reason"] is not None:
          rejected[res["reason"]] += 1
          rejected_by_cat[res["category"]][res["reason"]] += 1
          continue
        rec = res["record"]
        with open(os.path.join(cfg.out, rec["image"]), "wb") as f:
          f.write(res["image_bytes"])
        records.append(rec)
        if cfg.write_scenes:
          scenes[rec["id"]] = res["scene"]
      selected, _, _ = select(records, quotas)
      short = {c: quotas[c] - len(selected[c]) for c in quotas if len(selected[c]) < quotas[c]}
      if not short:
        break
      # Next round: enough indices for the worst category's shortfall, with slack for rejects.
      worst = max(short.values())
      block = ncat * math.ceil(worst * 1.3 + 2)
      bar.total += block
      bar.refresh()
  finally:
    bar.close()
    if pool is not None:
      pool.close()
      pool.join()
  final, selected = finalize(cfg, records, quotas, rejected, rejected_by_cat)
  short = {c: f"{len(selected[c])}/{quotas[c]}" for c in quotas if len(selected[c]) < quotas[c]}
  if short:
    print(f"fusion_jax.synth: WARNING: after {MAX_ROUNDS} rounds some categories are short of "
          f"their quota (kept/quota): {short}; see the rejection reasons in stats.json (e.g. "
          "text_unreadable at a very small --size)", file=sys.stderr)
  # Remove images of items dropped after the per-item filter.
  keep_images = {r["image"] for r in final}
  for rec in records:
    if rec["image"] not in keep_images:
      os.remove(os.path.join(cfg.out, rec["image"]))
  train, heldout = write_splits(cfg, final, scenes)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  stats = compute_stats(cfg, train, heldout, generated, rejected, rejected_by_cat, quotas)
  # Timing varies run to run: kept out of stats.json so that file stays byte-deterministic.
  timing = {"wall_s": round(wall, 3), "main_process_cpu_s": round(cpu, 3),
            "samples_per_s": round(generated / max(wall, 1e-9), 1),
            "samples_per_s_per_worker": round(generated / max(wall, 1e-9) / max(cfg.workers, 1),
                                              1)}
  write_stats(cfg, stats)
  stats["timing"] = timing
  return stats
