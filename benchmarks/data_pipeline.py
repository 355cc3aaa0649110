"""Input-pipeline throughput: static_hd at 384 px from 640x480 JPEGs (issue item 7), and
sequence-packing efficiency (data.packing).

    python benchmarks/data_pipeline.py [--num_images 128] [--workers 0,1,2] [--image_size 384]
                                       [--tokenizer DIR] [--batches 24] [--template phi_3]
    python benchmarks/data_pipeline.py --packing_only [--smoke_num 24000]

Reports, on this host:
  1. per-stage cost, one core, sequential: decode (JPEG -> RGB PIL), resize (static_hd: the
     2S x 2S and S x S bicubic resizes + tiling), tokenize (conversation -> segments, q check,
     layout). Their sum gives samples/s per core; `fast` = JPEG draft + reducing_gap resizes.
  2. the authors' image path on the same core, for the 2x target: PIL open + convert('RGB'),
     resize to 2S x 2S and crop 4 tiles, then the (PIL) SigLIP processor on the 4 tiles + the
     original (resize to S, x/255, (x-0.5)/0.5, float32, channels first).
  3. the whole grain pipeline (make_pipeline, train mode, batch 8) with k worker processes of
     one read thread each: samples/s, and samples/s per worker (= per core used for decode).
  4. packing efficiency (real tokens / row tokens): on the main job's data (experiments/
     smoke.py's synthesized dataset, its tokenizer and its two stages' seq_len), through the
     real pipeline unpacked and packed; and on a LLaVA-like length mix (length-only simulation
     of the same packer, fusion_jax.data.packing.simulate) at the paper's 4096 tokens.
Numbers from a shared machine are pessimistic; use them as ratios.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402
from fusion_jax.data import conversation, images, layout, pipeline  # noqa: E402
from fusion_jax.data.tokenizer import load_tokenizer  # noqa: E402
from fusion_jax.data.tokenizer_train import train_sentencepiece  # noqa: E402
from fusion_jax.models import query_len as query_len_lib  # noqa: E402

PROG = "python benchmarks/data_pipeline.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("num_images", 96, "640x480 JPEGs to make", flag_values=fv)
  flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts", flag_values=fv)
  flags.DEFINE_integer("image_size", 384, "static_hd image size (px)", flag_values=fv)
  flags.DEFINE_integer("batches", 16, "batches timed per pipeline setting", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "pipeline batch size", flag_values=fv)
  flags.DEFINE_string("tokenizer", "", "tokenizer dir/file (default: train a tiny one)",
                      flag_values=fv)
  flags.DEFINE_string("template", "phi_3", "conversation template", flag_values=fv)
  flags.DEFINE_string("out_json", "", "also write the results as JSON here", flag_values=fv)
  flags.DEFINE_boolean("packing_only", False, "only section 4", flag_values=fv)
  flags.DEFINE_integer("smoke_num", 24000,
                       "records of the main job's dataset (experiments/smoke.py: 24000)",
                       flag_values=fv)
  flags.DEFINE_integer("packing_batches", 60,
                       "batches of 16 rows read per setting on the main job's data",
                       flag_values=fv)

_WORDS = ("the a red blue green small large cat dog tree house car person table window left "
          "right above below near far bright dark two three several wooden metal glass sky "
          "water road field street sign text color shape count scene").split()


def _natural_jpeg(rng: np.random.Generator, w: int = 640, h: int = 480) -> bytes:
  """A photo-like 640x480 JPEG: smooth gradients, blobs, edges and sensor noise (q 90)."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.zeros((h, w, 3), np.float32)
  for c in range(3):
    a, b, p = rng.uniform(-1, 1, 3)
    img[..., c] = 128 + 60 * np.sin(a * xx / 90 + b * yy / 70 + p * 6)
  for _ in range(12):
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 140)
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    img[mask] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 6, img.shape)
  out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  buf = io.BytesIO()
  out.save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _sentence(rng: np.random.Generator, n: int) -> str:
  return " ".join(rng.choice(_WORDS, n)).capitalize() + "."


def make_data(root: str, n: int, seed: int = 0) -> tuple[str, list[dict]]:
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  recs = []
  for i in range(n):
    with open(os.path.join(root, "img", f"{i}.jpg"), "wb") as f:
      f.write(_natural_jpeg(rng))
    recs.append({"id": str(i), "image": f"img/{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\n" + _sentence(rng, 12)},
        {"from": "gpt", "value": " ".join(_sentence(rng, 15) for _ in range(4))}]})
  path = os.path.join(root, "data.json")
  with open(path, "w") as f:
    json.dump(recs, f)
  return path, recs


def _time_per_call(fn, items, repeat: int = 1) -> float:
  t0 = time.perf_counter()
  for _ in range(repeat):
    for x in items:
      fn(x)
  return (time.perf_counter() - t0) / (len(items) * repeat)


def stage_costs(root: str, recs: list[dict], tok, cfg: pipeline.DataConfig) -> dict[str, float]:
  """Seconds per sample of each stage on one core (sequential, no threads)."""
  paths = [os.path.join(root, r["image"]) for r in recs]
  data = {p: open(p, "rb").read() for p in paths}  # file reads out of the measurement
  s = cfg.image_size
  pils = [images.load_image(data[p]) for p in paths]
  out = {}
  out["decode"] = _time_per_call(lambda p: images.load_image(data[p]), paths)
  out["resize"] = _time_per_call(lambda im: images.static_hd_crops(im, s), pils)
  out["decode_fast"] = _time_per_call(
      lambda p: images.load_image(data[p], draft_size=2 * s), paths)
  pils_fast = [images.load_image(data[p], draft_size=2 * s) for p in paths]
  out["resize_fast"] = _time_per_call(lambda im: images.static_hd_crops(im, s, fast=True),
                                      pils_fast)

  def tokenize(r):
    enc = conversation.encode_conversation(r, tok, cfg.template)
    layout.check_sample(enc, q_max=max(cfg.query_len), num_image_tokens=cfg.num_image_tokens,
                        seq_len=cfg.seq_len, max_questions=cfg.max_questions)
    layout.layout_sample(enc, q=cfg.query_len[0], num_image_tokens=cfg.num_image_tokens,
                         seq_len=cfg.seq_len, max_questions=cfg.max_questions,
                         max_instruct_len=cfg.max_instruct_len, pad_id=tok.pad_id)

  out["tokenize"] = _time_per_call(tokenize, recs)
  try:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # pylint: disable=g-import-not-at-top
    proc = SiglipImageProcessorPil(size={"height": s, "width": s})

    def authors(p):
      im = Image.open(io.BytesIO(data[p])).convert("RGB")
      big = im.resize((2 * s, 2 * s))  # the authors' split_image (PIL default filter)
      tiles = [big.crop((x, y, x + s, y + s)) for y in (0, s) for x in (0, s)]
      proc.preprocess(tiles + [im], return_tensors="np")["pixel_values"]

    out["authors_image_path"] = _time_per_call(authors, paths)
  except ImportError:
    pass
  return out


def pipeline_rate(cfg: pipeline.DataConfig, tok, batches: int, warmup: int = 3) -> float:
  it = pipeline.make_pipeline(cfg, tok, process_index=0, process_count=1, train=True)
  try:
    for _ in range(warmup):
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    dt = time.perf_counter() - t0
  finally:
    it.close()
  return batches * cfg.batch_size / dt


def llava_like_lengths(n: int, seed: int = 0, *, num_image_tokens: int = 729,
                       query_len: tuple[int, ...] = query_len_lib.CANDIDATES) -> np.ndarray:
  """Sequence lengths of a LLaVA-like stage-2 mix (token counts of the phi_3 template, slots
  included; q drawn per sample from the candidates, standing in for q per batch):

    35 % image, one short question (VQA / caption): 729 + q + 40..250 text tokens (~850)
    30 % image conversations: 2..10 turns of q + 30..160 tokens each
    10 % image, long answer (OCR, documents, detailed description): 729 + q + 250..1500
    25 % text-only conversations: 1..8 turns, 60..3000 tokens in all (log-uniform)
  """
  rng = np.random.default_rng(seed)
  q = rng.choice(np.asarray(query_len), n)
  kind = rng.choice(4, n, p=[0.35, 0.30, 0.10, 0.25])
  out = np.zeros((n,), np.int64)
  system = 12
  for i in range(n):
    if kind[i] == 0:
      out[i] = system + num_image_tokens + q[i] + rng.integers(40, 251)
    elif kind[i] == 1:
      turns = rng.integers(2, 11)
      out[i] = system + num_image_tokens + sum(q[i] + rng.integers(30, 161) for _ in range(turns))
    elif kind[i] == 2:
      out[i] = system + num_image_tokens + q[i] + rng.integers(250, 1501)
    else:
      turns = rng.integers(1, 9)
      out[i] = system + turns * q[i] + int(np.exp(rng.uniform(np.log(60), np.log(3000))))
  return out


def smoke_packing(num: int, batches: int, samples_per_row: tuple[int, ...]) -> dict:
  """Packing efficiency of the real pipeline on the main job's data, per training stage."""
  from experiments.smoke import get_config  # pylint: disable=g-import-not-at-top
  from fusion_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from fusion_jax.data.tokenizer import TEMPLATE_PAD_TOKENS  # pylint: disable=g-import-not-at-top
  from fusion_jax.task.fusion import FusionTask  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.synth.num = num
  config = run_lib.prepare(config)
  out = {}
  for name, c, _ in run_lib.stage_plan(config, tempfile.mkdtemp()):
    task = FusionTask(c)
    tok = load_tokenizer(c.data.tokenizer, pad_token=TEMPLATE_PAD_TOKENS[task.cfg.template])
    base = task.data_config(1)
    rows = []
    for p in (1,) + tuple(samples_per_row):
      cfg = pipeline.DataConfig(**{**base.to_dict(), "query_len": base.query_len,
                                   "paths": base.paths, "num_epochs": 1, "prefetch": 0,
                                   "packing": p > 1, "max_samples_per_row": p})
      it = pipeline.make_pipeline(cfg, tok, process_index=0, process_count=1, train=True)
      real = samples = n_rows = 0
      try:
        for _ in range(batches):
          b = next(it)
          real += int(b["token_mask"].sum())
          samples += int(b["segment_ids"].max(axis=1).sum())
          n_rows += b["token_mask"].shape[0]
      except StopIteration:
        pass
      finally:
        it.close()
      rows.append({"samples_per_row_max": p, "efficiency": real / max(n_rows * cfg.seq_len, 1),
                   "samples_per_row": samples / max(n_rows, 1)})
    out[name] = {"seq_len": base.seq_len, "rows": rows}
  return out


def main(args) -> int:
  if args.packing_only:
    result = packing_report(args)
    if args.out_json:
      with open(args.out_json, "w") as f:
        json.dump(result, f, indent=1)
    return 0

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

  root = tempfile.mkdtemp(prefix="fusion_data_bench_")
  path, recs = make_data(root, args.num_images)
  if args.tokenizer:
    tok = load_tokenizer(args.tokenizer)
  else:
    texts = [t["value"].replace("<image>\n", "") for r in recs for t in r["conversations"]]
    train_sentencepiece(texts, os.path.join(root, "tok", "tokenizer"), 1000)
    tok = load_tokenizer(os.path.join(root, "tok"))
  cfg = pipeline.DataConfig(paths=(path,), image_root=root, image_size=args.image_size,
                            batch_size=args.batch_size, seq_len=2048, num_image_tokens=729,
                            template=args.template, read_threads=1, prefetch=2, seed=0)
  print(f"host: {os.cpu_count()} logical CPUs (shared machine: numbers are pessimistic); "
        f"{args.num_images} 640x480 JPEGs, static_hd at {args.image_size} px")

  costs = stage_costs(root, recs, tok, cfg)
  exact = costs["decode"] + costs["resize"] + costs["tokenize"]
  fast = costs["decode_fast"] + costs["resize_fast"] + costs["tokenize"]
  print("\n1. per-stage cost on one core (ms/sample) and share of the exact path:")
  for k in ("decode", "resize", "tokenize"):
    print(f"   {k:9s} {1e3 * costs[k]:7.2f} ms  {100 * costs[k] / exact:5.1f} %")
  print(f"   => exact path {1 / exact:6.1f} samples/s per core")
  print(f"   fast path: decode {1e3 * costs['decode_fast']:.2f} ms, resize "
        f"{1e3 * costs['resize_fast']:.2f} ms => {1 / fast:6.1f} samples/s per core")
  result = {"stage_ms": {k: 1e3 * v for k, v in costs.items()},
            "per_core_exact": 1 / exact, "per_core_fast": 1 / fast}
  if "authors_image_path" in costs:
    a = costs["authors_image_path"]
    print(f"\n2. authors' image path (PIL + SigLIP processor, float32 CHW): {1e3 * a:.2f} ms "
          f"=> {1 / a:6.1f} samples/s per core (images only)")
    print(f"   ours, images only: exact {1 / (costs['decode'] + costs['resize']):6.1f}/s "
          f"({a / (costs['decode'] + costs['resize']):.2f}x), fast "
          f"{1 / (costs['decode_fast'] + costs['resize_fast']):6.1f}/s "
          f"({a / (costs['decode_fast'] + costs['resize_fast']):.2f}x)")
    result["per_core_authors_images"] = 1 / a

  print(f"\n3. grain pipeline, batch {args.batch_size}, 1 read thread per worker:")
  result["pipeline"] = []
  for fast_images in (False, True):
    for k in [int(x) for x in args.workers if x.strip()]:
      c = pipeline.DataConfig(**{**cfg.to_dict(), "paths": (path,), "query_len": cfg.query_len,
                                 "worker_count": k, "fast_images": fast_images})
      rate = pipeline_rate(c, tok, args.batches)
      per = rate / max(k, 1)
      mode = "fast " if fast_images else "exact"
      print(f"   {mode} workers={k}: {rate:7.1f} samples/s  ({per:6.1f} per worker core)")
      result["pipeline"].append({"fast": fast_images, "workers": k, "samples_per_s": rate,
                                 "per_worker": per})
  result["packing"] = packing_report(args)
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump(result, f, indent=1)
  return 0


def packing_report(args) -> dict:
  """Section 4: packing efficiency, main job's data and a LLaVA-like length mix."""
  from fusion_jax.data import packing, packing_plan  # pylint: disable=g-import-not-at-top
  from fusion_jax.models import presets  # pylint: disable=g-import-not-at-top
  print("\n4. packing efficiency = real tokens / row tokens (P = max samples per row; "
        "P = 1 is unpacked)")
  print(f"   main job's data (experiments/smoke.py, {args.smoke_num} records), real pipeline, "
        f"{args.packing_batches} batches of 16 rows:")
  smoke = smoke_packing(args.smoke_num, args.packing_batches, (2, 3, 4))
  for name, r in smoke.items():
    cells = ", ".join(f"P={x['samples_per_row_max']}: {100 * x['efficiency']:.1f} % "
                      f"({x['samples_per_row']:.2f}/row)" for x in r["rows"])
    print(f"   stage {name:11s} seq_len {r['seq_len']}: {cells}")
  lengths = llava_like_lengths(20000)
  llava = {"lengths": {"mean": float(lengths.mean()),
                       "p50_p90_max": np.percentile(lengths, [50, 90, 100]).tolist()},
           "rows": []}
  print(f"   LLaVA-like mix (20000 samples, mean {lengths.mean():.0f} tokens, p50/p90/max "
        f"{'/'.join(f'{x:.0f}' for x in llava['lengths']['p50_p90_max'])}), seq_len 4096, "
        "16 rows per batch, length-only simulation:")
  for p in (1, 2, 3, 4, 6, 8, 16):
    r = packing.simulate(lengths, batch_size=16, seq_len=4096, samples_per_row=p,
                         buffer=2 * 16 * p)
    # FUSION 3B train-step FLOPs at the MFU benchmark's paper shapes (q 64, 4 questions and 256
    # instruction tokens per slot).
    cost = packing_plan.step_cost(presets.FUSION_3B, p=p, samples_per_row=r["samples_per_row"],
                                  seq_len=4096, q=64, max_questions=4, instruct_len=256)
    llava["rows"].append({"p": p, **r, **cost})
  print("\n".join("     " + line for line in packing_plan.format_table(llava["rows"]).split("\n")))
  print("     (FUSION 3B train-step model FLOPs per sample, fusion_jax.models.flops: every sample "
        "slot runs the tower's 5 crops, filled or not; q 64, 4 questions and 256 instruction "
        "tokens per slot)")
  return {"smoke": smoke, "llava_like": llava}


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
