r"""How many samples of a category does the vision tower alone need to answer it?

  python benchmarks/tower_probe.py --config experiments/smoke.py --workdir runs/tower_probe
      [--categories SynthSpatial,SynthCount] [--steps 3000] [--every 500] [--extra 0]
      [--config.KEY=VALUE ...]

The main job's visual-reasoning categories stay near chance (docs/main_job.md). This isolates
the tower: per category it trains FUSION's text-guided vision tower (the config's shape, its
attention rule and feature connector) with a classifier head in place of the LLM. The
instruction text is the question, the class is the answer's index among the question's
candidates, the image is the full static_hd view. No LLM, no tiles, no latents: a step costs
a few ms instead of a FUSION step's ~0.3 s, so the tower sees many more samples than the main
job can afford, which is the point: the curve shows how many it needs. `--extra N` synthesizes
N more training records of the probed categories (a new seed, cached like the main dataset) to
tell "too few distinct images" (over-fitting) from "too few steps".

Prints per category held-out / train accuracy against samples seen, chance, the main job's
target and how many samples of that category the main job trains on (stage steps x batch /
categories in the stage); writes <workdir>/tower_probe.json. Not a test (minutes of CPU).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from fusion_jax import run as run_lib  # noqa: E402
from fusion_jax.data.images import load_static_hd  # noqa: E402
from fusion_jax.data.tokenizer import (IMAGE_MARKER, TEMPLATE_PAD_TOKENS,  # noqa: E402
                                       load_tokenizer)
from fusion_jax.models.connector import feature_connector  # noqa: E402
from fusion_jax.models.fusion import FusionConfig  # noqa: E402
from fusion_jax.models.text_guided import text_guided_encode  # noqa: E402
from fusion_jax.models.vision import VisionTower  # noqa: E402
from fusion_jax.infer.workdir import fusion_config_of  # noqa: E402

FLAGS = flags.FLAGS
# --config and --workdir are fusion_jax.run's flags (defined when it is imported).
flags.DEFINE_list("categories", [], "categories to probe (default: every synthesized one)")
flags.DEFINE_integer("steps", 3000, "training steps per category")
flags.DEFINE_integer("every", 500, "evaluate every K steps")
flags.DEFINE_integer("extra", 0, "synthesize this many more training records (new seed)")
flags.DEFINE_float("lr", 0.0, "peak learning rate (0: the config's optim.lr)")
MAX_CLASSES = 8  # the largest candidate set of the synthesizer (the colour palette)


class TowerClassifier(nn.Module):
  """Text-guided tower -> feature connector -> attention pooling -> class logits."""
  cfg: FusionConfig
  vocab_size: int

  @nn.compact
  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """images (B, S, S, 3) uint8, ids / mask (B, T) -> logits (B, MAX_CLASSES)."""
    cfg = self.cfg
    tower = VisionTower(cfg.vision, name="vision_tower")
    patches = tower.embed(images.astype(jnp.float32) / 127.5 - 1.0)
    n = patches.shape[1]
    # Stands in for aux_projector(embed_tokens(instructs)) of the LLM this probe leaves out.
    text = nn.Embed(self.vocab_size, cfg.vision.hidden_size, name="text_embed")(ids)
    if cfg.text_guidance:
      hs = text_guided_encode(tower, patches, text, mask, cfg.vision_text_mask)
    else:  # the question still reaches the pooling below, as it reaches the LLM
      hs = [jnp.concatenate([h, text], axis=1) for h in tower.encode(patches)]
    valid = jnp.concatenate([jnp.ones((ids.shape[0], n), bool), mask], axis=1)
    feats = feature_connector(hs)  # (B, N + T, 3Dv)
    # The LLM's answer position reads the tokens by attention: one learned query here.
    query = self.param("query", nn.initializers.normal(0.02), (1, 1, feats.shape[-1]))
    pooled = nn.MultiHeadDotProductAttention(num_heads=cfg.vision.num_heads, name="pool")(
        jnp.broadcast_to(query, (feats.shape[0], 1, feats.shape[-1])), feats,
        mask=valid[:, None, None, :])
    return nn.Dense(MAX_CLASSES, name="head")(nn.LayerNorm()(pooled[:, 0]))


def _question(record: dict) -> tuple[dict, str] | None:
  """(qa entry, question text) of the record's first closed question; None if it has none."""
  if not record.get("image"):
    return None
  for turn, qa in enumerate(record.get("qa") or ()):
    if qa and qa.get("candidates"):
      return qa, record["conversations"][2 * turn]["value"].replace(IMAGE_MARKER, "").strip()
  return None


def examples(records: list[dict], image_root: str, tok, size: int, max_len: int
             ) -> dict[str, np.ndarray]:
  """The first closed question of each record: image, question ids/mask, label, #candidates."""
  out = {k: [] for k in ("images", "ids", "mask", "label", "num")}
  for r in records:
    qa, question = _question(r)  # callers pass records that have one
    ids = tok.encode(question)[:max_len]
    out["images"].append(load_static_hd(os.path.join(image_root, r["image"]), size,
                                        source=r["id"])[4])
    out["ids"].append(ids + [0] * (max_len - len(ids)))
    out["mask"].append([True] * len(ids) + [False] * (max_len - len(ids)))
    out["label"].append(qa["candidates"].index(qa["answer"]))
    out["num"].append(len(qa["candidates"]))
  return {k: np.asarray(v) for k, v in out.items()}


def main_job_samples(config: ml_collections.ConfigDict, category: str) -> int:
  """Samples of `category` the main job trains on (records are balanced over categories)."""
  total = 0.0
  for stage in config.stages:
    cats = tuple(stage[1]) or tuple(config.synth.categories)
    if category in cats:
      total += stage[2] * config.num_steps * config.global_batch / len(cats)
  return int(total)


def main(argv) -> None:
  del argv
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  logging.set_verbosity(logging.WARNING)
  config = run_lib.prepare(FLAGS.config)
  cfg = fusion_config_of(config)
  data_dir = config.data.image_root
  tok = load_tokenizer(config.data.tokenizer, pad_token=TEMPLATE_PAD_TOKENS[cfg.template])
  cats = FLAGS.categories or list(config.synth.categories)
  unknown = sorted(set(cats) - set(config.synth.categories))
  if unknown:
    raise app.UsageError(f"--categories {unknown} are not in the config's synth.categories")
  load = lambda path: json.load(open(path))  # noqa: E731
  train = load(os.path.join(data_dir, "train.json"))
  heldout = load(os.path.join(data_dir, "heldout.json"))
  extra_dir = None
  if FLAGS.extra:
    synth = ml_collections.ConfigDict(config.synth.to_dict())
    synth.update(num=FLAGS.extra, seed=synth.seed + 1000, categories=tuple(cats))
    extra_dir = run_lib.synthesize(synth)
  lr = FLAGS.lr or config.optim.lr
  bs, size, max_len = config.global_batch, cfg.vision.image_size, cfg.max_instruct_len
  model = TowerClassifier(cfg, len(tok))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, FLAGS.steps // 20), FLAGS.steps)
  tx = optax.adamw(sched, weight_decay=0.0)

  def loss_fn(p, b):
    logits = model.apply(p, b["images"], b["ids"], b["mask"])
    logits = jnp.where(jnp.arange(MAX_CLASSES) < b["num"][:, None], logits, -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean(), logits

  @jax.jit
  def step(p, o, b):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  @jax.jit
  def correct(p, b):
    return jnp.sum(jnp.argmax(loss_fn(p, b)[1], -1) == b["label"])

  def accuracy(p, d):
    return sum(int(correct(p, {k: v[i:i + 256] for k, v in d.items()}))
               for i in range(0, len(d["label"]), 256)) / len(d["label"])

  results = {}
  for cat in cats:
    t0 = time.time()
    of_cat = lambda recs: [r for r in recs if r["category"] == cat and _question(r)]  # noqa: E731
    tr_recs, te_recs = of_cat(train), of_cat(heldout)
    ex_recs = of_cat(load(os.path.join(extra_dir, "train.json"))) if extra_dir else []
    # The category's longest question (not the model's max) bounds T: shorter steps.
    t = min(max_len, max((len(tok.encode(_question(r)[1]))
                          for r in tr_recs + te_recs + ex_recs), default=1))
    tr = examples(tr_recs, data_dir, tok, size, t)
    if ex_recs:
      ex = examples(ex_recs, extra_dir, tok, size, t)
      tr = {k: np.concatenate([tr[k], ex[k]]) for k in tr}
    te = examples(te_recs, data_dir, tok, size, t)
    if not tr_recs or not te_recs:
      print(f"{cat}: no closed questions with images; skipped")
      continue
    chance = float(np.mean(1.0 / te["num"]))
    target = max(run_lib.ACCURACY_TARGET.get(cat, 0.0), run_lib.CHANCE_MULTIPLE * chance)
    sub = {k: v[:300] for k, v in tr.items()}
    p = model.init(jax.random.key(config.seed), tr["images"][:2], tr["ids"][:2], tr["mask"][:2])
    o = tx.init(p)
    rng = np.random.default_rng(config.seed)
    rows = []
    print(f"\n{cat}: {len(tr['label'])} training records, {len(te['label'])} held out, chance "
          f"{chance:.3f}, target {target:.2f}; the main job trains on "
          f"{main_job_samples(config, cat)} samples of it")
    print(f"  {'samples':>8} {'heldout':>8} {'train':>6} {'loss':>6}")
    train_s = 0.0
    for s in range(1, FLAGS.steps + 1):
      idx = rng.integers(0, len(tr["label"]), bs)
      t1 = time.time()
      p, o, loss = step(p, o, {k: v[idx] for k, v in tr.items()})
      if s > 1:  # the first step compiles
        jax.block_until_ready(loss)
        train_s += time.time() - t1
      if s % FLAGS.every == 0 or s == FLAGS.steps:
        row = dict(step=s, samples=s * bs, heldout=accuracy(p, te), train=accuracy(p, sub),
                   loss=float(loss))
        rows.append(row)
        print(f"  {row['samples']:>8} {row['heldout']:>8.3f} {row['train']:>6.3f} "
              f"{row['loss']:>6.3f}", flush=True)
    results[cat] = dict(train_records=len(tr["label"]), heldout=len(te["label"]), chance=chance,
                        target=target, main_job_samples=main_job_samples(config, cat),
                        curve=rows, seconds=time.time() - t0,
                        step_time_s=train_s / max(1, FLAGS.steps - 1))
    print(f"  {1000 * results[cat]['step_time_s']:.1f} ms/step (batch {bs})")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  out = os.path.join(FLAGS.workdir, "tower_probe.json")
  with open(out, "w") as f:
    json.dump(dict(steps=FLAGS.steps, batch=bs, lr=lr, extra=FLAGS.extra, results=results), f,
              indent=2)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  app.run(main)
