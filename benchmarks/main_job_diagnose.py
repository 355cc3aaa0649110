r"""Why the main job does not learn the non-colour categories: cheap diagnostics on a finished
run (no training).

  python benchmarks/main_job_diagnose.py --workdir runs/smoke [--batches 4] [--out FILE.json]

For a main-job workdir (experiments/smoke.py: stage 1 in <workdir>/stages/<name>, the last
stage in <workdir>, the imported base model in <workdir>/base_model) it prints:

  1. stage hand-over: the cross entropy of {base model, each stage's final params} on the
     first batches of each stage's data, with the run's own stage config (template, seq_len,
     loss mask). A stage that starts from the previous one's weights should start near that
     one's final loss on the same kind of data.
  2. vision dependence: each trained stage's loss on its own data with the images as given,
     zeroed, and shuffled across the batch (rolled by one row): all crops, only the full view
     (the image tokens' source), only the tiles (the mosaic: latents and context windows), and
     with the image tokens left out of their slots. Unchanged loss = that path carries nothing.
  3. per-category answer statistics of the training and held-out records: majority-answer
     accuracy (what a question-only model reaches) next to the eval's chance.
  5. what the LLM sees of the image: norms of the image tokens vs the text embedding rows, and
     how alike one image's tokens are after RMS normalisation (mean pairwise cosine within an
     image, and across images at the same patch), for the base model and each stage's params.

Measured on runs/bases_vs_random/bases (benchmarks/bases_vs_random.py, 600 + 400 steps from
assets/tiny_bases; 2 loaded cores, ~3 min per section):
  1. CE base / alignment@final / instruction@final: on alignment data 2.95 / 0.295 / 0.297, on
     instruction data 4.47 / 5.19 / 0.28. Stage 2's first loss (5.86) is stage 1's weights on
     the new long answers (worse than the base LM: stage 1 forgot free text), not a reset.
  2. alignment: given 0.295, zero 1.13, shuffle 0.90, shuffle_full 0.39, shuffle_tiles 0.72,
     no_image_tokens 0.304: the 16 image tokens carry almost nothing; the image reaches the
     answer through the mosaic (latents / context windows), i.e. max-pooled colour.
  4. train records = held-out records (40 per category): Color 1.0, Count/Spatial/Scene at
     chance on both; shuffled images drop Color to 0.1. Summed log-probabilities per candidate
     (Spatial ~ -1.4 = ln 4, Count ~ -1.8 = ln 6): the uniform prior over the answer set.
  5. image-token norm 4.3 (base) -> 41 (stage 1) -> 74 (stage 2) against text rows of 0.3.
  6. pattern probe on the image tokens: majority 0.24, base 0.53, stage 1 0.45, stage 2 0.33:
     the answer is in the image tokens and training erodes it; the LLM does not read it.
  With latents off (experiments/smoke.py:no_latents, the image tokens the only path) Color is
  0.92 and Count / Spatial / Scene stay at chance (0.12 / 0.13 / 0.12): the image tokens
  carry colour to the answer but nothing localised.
  Twice the steps (--config.num_steps=2000, 1455 s): stage 1 (1200 steps) held-out Count /
  Scene / Spatial 0.25 / 0.18 / 0.18; the job's table all 0.349 vs 0.330 (Count 0.27, Scene
  0.20, Spatial 0.30, n = 60 each): noise. The stage-1 loss plateaus at ~0.3 (the uniform
  prior over the non-colour answers) from step ~200 in both: stuck, not under-trained.
  From the bases pretrained with QA facts (assets/tiny_bases/README.md, tower at lr / 10), the
  same sections: 2. alignment given 0.262, zero 0.979, shuffle_full 0.574, shuffle_tiles 0.357,
  no_image_tokens 0.357 (the image tokens now carry the answer: Count 0.450 held-out);
  5. image-token norm 5.4 -> 11.9 -> 15.7; 6. pattern probe base 0.51, stage 1 0.43,
  stage 2 0.42.
  With the dense pretraining term (a 600-step tower of that recipe, 600 + 400 steps, colour at
  full share): 6. pattern probe base 0.930, stage 1 0.592, stage 2 0.556, yet held-out Scene
  pattern questions 3 of 26 (always "striped"): the pattern is in the tokens the LLM gets and
  it does not read it in ~1 000 pattern samples. A stage on SynthScene alone read it (25 of 26)
  after ~1 400 (its loss drops between steps 150 and 200): hence experiments/smoke.py's
  colour share in stage 1.
  6. a ridge probe of the background pattern (SynthScene pattern questions: the answer needs
     the image only) on the flattened image tokens each params hand the LLM: is what the
     answer needs in the image tokens (then the LLM does not read it) or not.
  4. closed-QA accuracy per category (the eval's scorer) of the final params on --per_category
     records of each category from the training file and from the held-out file, with each
     record's own image and with the image of another record of its category (shuffled).
"""
from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402

PROG = "python benchmarks/main_job_diagnose.py"
SECTIONS = ("handover", "vision", "answers", "tokens", "probe", "accuracy")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "the main job's workdir", flag_values=fv, required=True)
  flags.DEFINE_integer("batches", 4, "batches of each stage's data", flag_values=fv)
  flags.DEFINE_string("out", "", "also write the report as JSON here", flag_values=fv)
  flags.DEFINE_integer("per_category", 40, "records per category for the accuracy section",
                       flag_values=fv)
  flags.DEFINE_list("skip", [], "sections to skip: " + ",".join(SECTIONS), flag_values=fv)


def _stage_dirs(workdir: str) -> list[tuple[str, str]]:
  """[(name, run dir)] of the job's stages in training order (the last one is `workdir`)."""
  from fusion_jax.infer import workdir as wd
  last = wd.run_config(workdir)
  rows = list(last.get("stages") or [])
  out = []
  for row in rows[:-1]:
    out.append((row[0], os.path.join(workdir, "stages", row[0])))
  out.append((rows[-1][0] if rows else "all", workdir))
  return out


def _task(config: ml_collections.ConfigDict):
  from fusion_jax.task.fusion import FusionTask
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.worker_count = 0
  config.data.shuffle = True
  return FusionTask(config)


def _batches(task, n: int) -> list[dict[str, np.ndarray]]:
  it = task.make_data_iterator(0, 1)
  out = []
  for _ in range(n):
    b = next(it)
    out.append({k: np.asarray(b[k]) for k in task.batch_axes})
  return out


def _merge(fresh: Any, stored: Any) -> Any:
  """`fresh` with every leaf `stored` has (same path) replaced: the trainer's init_from rule."""
  from fusion_jax.train.init_from import _flat
  s = _flat(stored)
  flat, treedef = jax.tree_util.tree_flatten_with_path(fresh)
  from fusion_jax.train.optimizer import path_str
  leaves = []
  for p, leaf in flat:
    x = s.get(path_str(p))
    leaves.append(leaf if x is None or tuple(x.shape) != tuple(leaf.shape)
                  else jnp.asarray(x, leaf.dtype))
  return treedef.unflatten(leaves)


def _params(task, source: str, step: int | None = None) -> Any:
  """A run's (or model dir's) params in `task`'s layout; missing leaves from task's init."""
  from fusion_jax.infer.load import load_model
  m = load_model(source, step=step)
  fresh = task.init_params(jax.random.key(0))
  import flax.linen as nn
  fresh = nn.meta.unbox(fresh)
  return _merge(fresh, task.adapt_params(m.params))


def _ce(task, params: Any, batches: list[dict[str, np.ndarray]],
        image_mode: str = "given") -> float:
  """Token-weighted cross entropy over `batches` (image_mode: given | zero | shuffle)."""
  @jax.jit
  def f(params, batch):
    sums, _ = task.loss_fn(params, batch, jax.random.key(0))
    dens = task.loss_denominators(batch)
    return sums["ce"], dens["ce"]
  tot, den = 0.0, 0.0
  for b in batches:
    b = dict(b)
    if image_mode == "zero":
      b["images"] = np.zeros_like(b["images"])
    elif image_mode == "shuffle":
      b["images"] = np.roll(b["images"], 1, axis=0)
    elif image_mode == "shuffle_full":  # the full view (image tokens) from another row
      b["images"] = b["images"].copy()
      b["images"][:, :, 4] = np.roll(b["images"][:, :, 4], 1, axis=0)
    elif image_mode == "shuffle_tiles":  # the tiles (mosaic: latents, context) from another row
      b["images"] = b["images"].copy()
      b["images"][:, :, :4] = np.roll(b["images"][:, :, :4], 1, axis=0)
    elif image_mode == "no_image_tokens":  # the image slots keep their pad embedding
      b["image_start"] = np.full_like(b["image_start"], -1)
    s, d = f(params, b)
    tot += float(s)
    den += float(d)
  return tot / max(den, 1.0)


def _token_stats(task, params: Any, batch: dict[str, np.ndarray]) -> dict[str, float]:
  """Image-token norm, text-embedding row norm, and mean cosine of RMS-normalised image tokens
  within an image (patch vs patch) and across the batch's images (same patch)."""
  from fusion_jax.models import fusion
  flat = lambda x: jnp.asarray(x).reshape((-1,) + x.shape[2:])  # noqa: E731
  vis = fusion.Fusion(task.cfg).apply(
      {"params": params}, flat(batch["images"]), flat(batch["has_image"]),
      flat(batch["instructs"]), flat(batch["instructs_mask"]),
      method=fusion.Fusion.encode_images)
  keep = np.asarray(flat(batch["has_image"]))
  x = np.asarray(vis["image_tokens"], np.float64)[keep]  # (M, N, D)
  u = x / np.linalg.norm(x, axis=-1, keepdims=True)
  n, m = u.shape[1], u.shape[0]
  within = (np.einsum("mnd,mkd->mnk", u, u).sum((1, 2)) - n) / (n * (n - 1))
  across = (np.einsum("mnd,knd->nmk", u, u).sum((1, 2)) - m) / (m * (m - 1))
  emb = [np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params["llm"])[0]
         if "embed" in jax.tree_util.keystr(k)][0]
  return {"image_token_norm": float(np.linalg.norm(x, axis=-1).mean()),
          "text_embedding_norm": float(np.linalg.norm(emb, axis=-1).mean()),
          "cos_within_image": float(within.mean()), "cos_across_images": float(across.mean())}


def _pattern_probe(task, params: dict[str, Any], config: ml_collections.ConfigDict,
                   num: int = 1200) -> dict[str, float]:
  """{params name: test accuracy} of a ridge classifier of the background pattern from the
  flattened image tokens (70/30 split, best of 4 penalties; 'majority' = the majority rate)."""
  from fusion_jax.data.images import record_images
  from fusion_jax.models import fusion
  with open(config.data.paths[0]) as f:
    records = [r for r in json.load(f) if r.get("category") == "SynthScene"
               and (r.get("qa") or [{}])[0].get("kind") == "pattern"][:num]
  cands = sorted({r["qa"][0]["answer"] for r in records})
  y = np.array([cands.index(r["qa"][0]["answer"]) for r in records])
  size = task.cfg.vision.image_size
  imgs = np.stack([record_images(r, size, image_root=config.data.image_root) for r in records])
  tok = task.tokenizer
  t = task.cfg.max_instruct_len
  ins = np.zeros((len(records), t), np.int32)
  for i, r in enumerate(records):
    ids = tok.encode(r["conversations"][0]["value"].replace("<image>", "").strip())[:t]
    ins[i, :len(ids)] = ids
  mask = np.arange(t)[None] < (ins != 0).sum(1, keepdims=True)
  n_train = int(0.7 * len(y))
  out = {"majority": float(max(np.mean(y[n_train:] == c) for c in range(len(cands))))}
  enc = jax.jit(lambda p, im, ins, m: fusion.Fusion(task.cfg).apply(
      {"params": p}, im, jnp.ones((im.shape[0],), bool), ins, m,
      method=fusion.Fusion.encode_images)["image_tokens"])
  for name, p in params.items():
    feats = np.concatenate([np.asarray(enc(p, imgs[i:i + 64], ins[i:i + 64], mask[i:i + 64]))
                            for i in range(0, len(y), 64)]).reshape(len(y), -1)
    mu, sd = feats[:n_train].mean(0), feats[:n_train].std(0) + 1e-6
    x = (feats - mu) / sd
    onehot = np.eye(len(cands))[y[:n_train]]
    best = 0.0
    for lam in (1.0, 10.0, 100.0, 1000.0):
      w = np.linalg.solve(x[:n_train].T @ x[:n_train] + lam * np.eye(x.shape[1]),
                          x[:n_train].T @ onehot)
      best = max(best, float(np.mean(np.argmax(x[n_train:] @ w, 1) == y[n_train:])))
    out[name] = best
  return out


def _answer_stats(path: str) -> dict[str, dict[str, Any]]:
  """{category: {n, distinct answers, majority answer, its share}} of a records file."""
  with open(path) as f:
    records = json.load(f)
  answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in records:
    conv = r["conversations"]
    for t in conv:
      if t["from"] == "gpt":
        answers[r.get("category", "?")][t["value"].strip().lower()] += 1
  out = {}
  for cat, cnt in sorted(answers.items()):
    n = sum(cnt.values())
    top, k = cnt.most_common(1)[0]
    out[cat] = {"n": n, "distinct": len(cnt), "majority": top[:40], "majority_share": k / n,
                "top5": [(a[:30], c) for a, c in cnt.most_common(5)]}
  return out


def _accuracy(workdir: str, config: ml_collections.ConfigDict, per_category: int
              ) -> dict[str, Any]:
  """{split/images: {category: accuracy}} of the run's final params (section 4)."""
  from fusion_jax.eval import closed_qa
  from fusion_jax.eval.evaluate import split_path
  from fusion_jax.infer.load import load_model
  m = load_model(workdir)
  out = {}
  print(f"\n4. closed-QA accuracy of the final params ({per_category} records per category):")
  for split, path in (("train", config.data.paths[0]), ("heldout", split_path(config, "heldout"))):
    with open(path) as f:
      records = json.load(f)
    by_cat: dict[str, list] = collections.defaultdict(list)
    for r in records:
      if r.get("qa") and len(by_cat[r.get("category")]) < per_category:
        by_cat[r.get("category")].append(r)
    recs = [r for c in sorted(by_cat) for r in by_cat[c]]
    for mode in ("own image", "shuffled image"):
      rs = recs
      if mode == "shuffled image":  # each record gets the image of the next one of its category
        rs = []
        for c in sorted(by_cat):
          group = by_cat[c]
          rs += [{**r, "image": group[(i + 1) % len(group)]["image"]} for i, r in enumerate(group)]
      rep = closed_qa.evaluate(m.params, m.cfg, rs, m.tokenizer, image_root=m.image_root, q=m.q,
                               seq_len=int(m.seq_len), max_questions=m.max_questions,
                               batch_size=32)
      out[f"{split}/{mode}"] = {c: r["accuracy"] for c, r in rep.items()}
      out[f"{split}/chance"] = {c: r["chance"] for c, r in rep.items()}
  cats = list(out["train/own image"])
  keys = [k for k in out if not k.endswith("chance")] + ["heldout/chance"]
  print(f"  {'category':<20}" + "".join(f"{k:>24}" for k in keys))
  for c in cats:
    print(f"  {c:<20}" + "".join(f"{out[k].get(c, float('nan')):>24.3f}" for k in keys))
  return out


def main(args) -> int:
  skip = set(filter(None, args.skip))
  from fusion_jax.infer import workdir as wd
  workdir = os.path.abspath(args.workdir)
  stages = _stage_dirs(workdir)
  configs = {name: wd.run_config(d) for name, d in stages}
  tasks = {name: _task(c) for name, c in configs.items()}
  report: dict[str, Any] = {"workdir": workdir, "stages": [n for n, _ in stages]}
  data = {name: _batches(t, args.batches) for name, t in tasks.items()}
  sources = [("base", os.path.join(workdir, "base_model"))] if os.path.isdir(
      os.path.join(workdir, "base_model")) else []
  sources += [(f"{name}@final", d) for name, d in stages]
  # Params in the last stage's layout (all stages share the model config).
  last_task = tasks[stages[-1][0]]
  params = {s: _params(last_task, d) for s, d in sources}

  if "handover" not in skip:
    print("\n1. cross entropy of each start/final params on each stage's data "
          f"({args.batches} batches):")
    table = {}
    print(f"{'params':<22}" + "".join(f"{n + ' data':>22}" for n, _ in stages))
    for s, _ in sources:
      row = {n: _ce(tasks[n], params[s], data[n]) for n, _ in stages}
      table[s] = row
      print(f"{s:<22}" + "".join(f"{row[n]:>22.3f}" for n, _ in stages))
    report["handover"] = table

  if "vision" not in skip:
    print("\n2. each stage's final params on its own data: images given / zeroed / shuffled:")
    vis = {}
    for n, _ in stages:
      row = {m: _ce(tasks[n], params[f"{n}@final"], data[n], m)
             for m in ("given", "zero", "shuffle", "shuffle_full", "shuffle_tiles",
                       "no_image_tokens")}
      vis[n] = row
      print(f"  {n:<14} " + "  ".join(f"{m} {v:.3f}" for m, v in row.items()))
    report["vision"] = vis

  if "answers" not in skip:
    from fusion_jax.eval.evaluate import split_path
    train = configs[stages[-1][0]].data.paths[0]
    held = split_path(configs[stages[-1][0]], "heldout")
    print("\n3. answers per category: training majority answer and its share (train / heldout)")
    tr, he = _answer_stats(train), _answer_stats(held)
    for cat in tr:
      h = he.get(cat, {})
      print(f"  {cat:<20} n={tr[cat]['n']:>6} distinct={tr[cat]['distinct']:>5} "
            f"majority={tr[cat]['majority']!r:<24} share train {tr[cat]['majority_share']:.3f}"
            f" heldout {h.get('majority_share', float('nan')):.3f}")
    report["answers"] = {"train": tr, "heldout": he}
  if "tokens" not in skip:
    print("\n5. image tokens as the LLM sees them (first batch of the first stage's data):")
    first = stages[0][0]
    report["tokens"] = {s: _token_stats(last_task, params[s], data[first][0]) for s, _ in sources}
    for s, row in report["tokens"].items():
      print(f"  {s:<22} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
  if "probe" not in skip:
    print("\n6. ridge probe of the background pattern on the image tokens (test accuracy):")
    report["probe"] = _pattern_probe(last_task, params, configs[stages[0][0]])
    for s, acc in report["probe"].items():
      print(f"  {s:<22} {acc:.3f}")
  if "accuracy" not in skip:
    report["accuracy"] = _accuracy(workdir, configs[stages[-1][0]], args.per_category)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
