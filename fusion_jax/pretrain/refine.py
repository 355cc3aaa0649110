r"""Refines a pretrained tiny SigLIP tower with dense targets only: what covers each patch,
each object's shape read from its own tokens and, optionally, each token's own grid position.

  python -m fusion_jax.pretrain.refine --base assets/tiny_bases --out OUT
      [--config experiments/smoke.py] [--num 16000] [--steps 6000] [--lr 1e-3]
      [--object_weight 1] [--position_weight 0]

The sigmoid pretraining (fusion_jax.pretrain) leaves a tower whose tokens name an object's
shape for only half the objects, and the main job's LLM cannot learn shape questions from that
in its budget. FUSION's LLM finds an object by its colour and reads the tokens it covers, so
this phase trains exactly that: a linear head on the coverage-weighted mean of an object's patch
tokens (the layer FUSION reads) names its shape, next to `tower.dense_loss`'s per-patch terms
(fresh heads; neither is shipped). The sigmoid pretraining also leaves tokens from which their
own column is read worse than from a random tower's (0.57 vs 0.81,
benchmarks/tower_features_probe.py); `--position_weight` adds a head that names each token's
row and column, since an LLM head that finds an object by colour reads the values of its
tokens, not their positions. Without the text side a step is ~10x cheaper than a sigmoid
step. Scenes come from their own seed (REFINE_SEED, disjoint from the main job's and from the
sigmoid pretraining's); the last HOLD are kept out for the log. Writes OUT/siglip (the refined
tower, same shapes), copies BASE/phi3 to OUT/phi3 and writes OUT/refine_log.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from fusion_jax import cli
from fusion_jax.pretrain import pairs, tower
from fusion_jax.synth.scene import SHAPES

PROG = "python -m fusion_jax.pretrain.refine"
REFINE_SEED = pairs.PRETRAIN_SEED + 7  # +1 is benchmarks/tower_features_probe.py's
HOLD = 512
MAX_OBJECTS = 8  # objects per scene with a shape target (the synthesizer draws at most 6)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("base", "assets/tiny_bases", "bases dir with siglip/ and phi3/",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output bases dir", flag_values=fv, required=True)
  flags.DEFINE_string("config", "experiments/smoke.py", "experiment config (its synth "
                      "categories and image size)", flag_values=fv)
  flags.DEFINE_integer("num", 16000, "synthesized scenes", flag_values=fv)
  flags.DEFINE_integer("steps", 6000, "training steps", flag_values=fv)
  flags.DEFINE_integer("batch", 256, "scenes per step", flag_values=fv)
  flags.DEFINE_float("lr", 1e-3, "peak learning rate (warmup 5 %, cosine to 5 %)",
                     flag_values=fv)
  flags.DEFINE_float("object_weight", 1.0, "weight of the per-object shape term",
                     flag_values=fv)
  flags.DEFINE_float("position_weight", 0.0, "weight of the per-patch position term (each "
                     "token names its own grid row and column)", flag_values=fv)


def patch_shares(codes: np.ndarray, code: int, patch: int) -> np.ndarray:
  """(P,) share of each patch's pixels that show object `code` (patches row-major as the
  tower's tokens; pixels past the last whole patch are ignored)."""
  g = codes.shape[0] // patch
  return (codes[:g * patch, :g * patch] == code).reshape(g, patch, g, patch).mean((1, 3)).ravel()


def object_targets(items: Sequence[pairs.Item], patch: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(N, K, P) float32 weights: per object (a distinct shape and colour drawn in the scene),
  each patch's share of its pixels; (N, K) int32 shape class (1 + index in SHAPES, -1 = no
  object). K = MAX_OBJECTS, patches row-major as the tower's tokens."""
  g = items[0].image.shape[0] // patch
  weights = np.zeros((len(items), MAX_OBJECTS, g * g), np.float32)
  shapes = np.full((len(items), MAX_OBJECTS), -1, np.int32)
  for n, it in enumerate(items):
    codes = tower.label_codes(it.object_labels)
    for k, c in enumerate([c for c in np.unique(codes) if c > 0][:MAX_OBJECTS]):
      share = patch_shares(codes, c, patch)
      weights[n, k] = share / share.sum()
      shapes[n, k] = c // tower.DENSE_CLASSES[1]
  return weights, shapes


class Heads(nn.Module):
  """(B, M, Dv) tokens -> (dense logits (B, M, sum(DENSE_CLASSES)), shape logits (B, M, 6),
  position logits (B, M, 2 * grid): row, then column)."""
  grid: int

  @nn.compact
  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (nn.Dense(sum(tower.DENSE_CLASSES))(nn.LayerNorm()(h)),
            nn.Dense(1 + len(SHAPES))(nn.LayerNorm()(h)),
            nn.Dense(2 * self.grid)(nn.LayerNorm()(h)))


def position_loss(logits: jax.Array, grid: int) -> tuple[jax.Array, jax.Array]:
  """logits (B, grid * grid, 2 * grid) of row-major patch tokens -> (mean cross entropy of
  each token's row and column, accuracy of both right)."""
  idx = jnp.broadcast_to(jnp.arange(grid * grid), logits.shape[:-1])
  ce_r = optax.softmax_cross_entropy_with_integer_labels(logits[..., :grid], idx // grid)
  ce_c = optax.softmax_cross_entropy_with_integer_labels(logits[..., grid:], idx % grid)
  right = ((jnp.argmax(logits[..., :grid], -1) == idx // grid)
           & (jnp.argmax(logits[..., grid:], -1) == idx % grid))
  return jnp.mean(ce_r + ce_c), jnp.mean(right)


def refine_tower(vision: tower.VisionConfig, tower_params: dict[str, Any], images: np.ndarray,
                 dense: np.ndarray, weights: np.ndarray, shapes: np.ndarray, *, steps: int,
                 batch: int = 256, lr: float = 1e-3, object_weight: float = 1.0,
                 position_weight: float = 0.0, hold: int = HOLD, log: Callable[[str], None] = print
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray], list[float]]:
  """Trains the tower (all its layers; the loss reads layer -2, the last one FUSION keeps) and
  fresh heads on the first N - hold scenes. Returns (tower params, held-out accuracies, losses):
  accuracies {"dense": (3,) as tower.dense_loss, "object_shape": (), "position": ()}."""
  grid = vision.grid_size
  vt, heads = tower.VisionTower(vision), Heads(grid)
  params = {"tower": tower_params,
            "heads": heads.init(jax.random.key(1),
                                jnp.zeros((1, dense.shape[1], vision.hidden_size)))["params"]}
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
  state = opt.init(params)

  def loss_fn(p, pix, labels, w, y):
    h = vt.apply({"params": p["tower"]}, pix)[-2]
    dense_logits, _, pos_logits = heads.apply({"params": p["heads"]}, h)
    l_dense, acc = tower.dense_loss(dense_logits, labels)
    l_pos, pos_acc = position_loss(pos_logits, grid)
    _, shape_logits, _ = heads.apply({"params": p["heads"]}, jnp.einsum("bkp,bpd->bkd", w, h))
    valid = (y > 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(shape_logits, jnp.maximum(y, 0))
    l_obj = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
    obj_acc = jnp.sum((jnp.argmax(shape_logits, -1) == y) * valid) / jnp.maximum(valid.sum(), 1)
    loss = l_dense + object_weight * l_obj
    if position_weight:  # off: the shape-only refine's weights, bitwise (checked)
      loss = loss + position_weight * l_pos
    return loss, (l_dense, l_obj, acc, obj_acc, pos_acc)

  @jax.jit
  def step(p, st, pix, labels, w, y):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, pix, labels, w, y)
    updates, st = opt.update(grads, st, p)
    return optax.apply_updates(p, updates), st, loss, aux

  rng = np.random.default_rng(0)
  n = len(images) - hold
  losses: list[float] = []
  t0 = time.time()
  for i in range(steps):
    idx = np.sort(rng.choice(n, batch, replace=False))
    params, state, loss, (l_dense, l_obj, acc, obj_acc, pos_acc) = step(
        params, state, tower.normalize(images[idx]), dense[idx], weights[idx], shapes[idx])
    losses.append(float(loss))
    if (i + 1) % max(1, steps // 10) == 0 or i == 0:
      log(f"refine step {i + 1}/{steps}: dense {float(l_dense):.3f} (shape / colour / pattern "
          f"{' / '.join(f'{a:.2f}' for a in np.asarray(acc))}), object shape {float(l_obj):.3f} "
          f"({float(obj_acc):.2f}), position {float(pos_acc):.2f}, {time.time() - t0:.0f} s")
  te = slice(n, len(images))
  _, (_, _, acc, obj_acc, pos_acc) = loss_fn(params, tower.normalize(images[te]), dense[te],
                                              weights[te], shapes[te])
  return (jax.tree.map(np.asarray, params["tower"]),
          {"dense": np.asarray(acc), "object_shape": np.asarray(obj_acc),
           "position": np.asarray(pos_acc)}, losses)


def build(args: types.SimpleNamespace, argv: Sequence[str] | None = None) -> int:
  from fusion_jax.convert.hf import read_config
  from fusion_jax.convert.hf_siglip import (siglip_config_from_hf, siglip_params_from_reader,
                                            siglip_prefix)
  from fusion_jax.convert.safetensors_io import SafetensorsReader
  from fusion_jax.pretrain.__main__ import load_experiment

  def log(msg: str) -> None:
    print(f"[{PROG}] {msg}", flush=True)

  if args.num - HOLD < args.batch:
    cli.usage_error(PROG, f"--num {args.num} leaves {args.num - HOLD} training scenes after the "
                    f"{HOLD} held out, fewer than --batch {args.batch}; raise --num")
  t_all = time.time()
  _, config = load_experiment(args.config)
  src = os.path.join(args.base, "siglip")
  vision = dataclasses.replace(siglip_config_from_hf(read_config(src)), dtype="float32")
  reader = SafetensorsReader(src)
  params = siglip_params_from_reader(reader, siglip_prefix(reader), vision.num_layers,
                                     config=vision, dtype=np.float32)
  size = int(config.synth.size)
  if size != vision.image_size:
    raise ValueError(f"{args.config}: synth.size {size} != the tower's image_size "
                     f"{vision.image_size} ({src})")
  t = time.time()
  items = pairs.build_items(args.num, tuple(config.synth.categories), size, seed=REFINE_SEED)
  log(f"{len(items)} scenes (seed {REFINE_SEED}, {size} px) in {time.time() - t:.0f} s")
  images = np.stack([it.image for it in items])
  dense = tower.patch_labels(items, vision.patch_size)
  weights, shapes = object_targets(items, vision.patch_size)
  t = time.time()
  refined, acc, losses = refine_tower(vision, params, images, dense, weights, shapes,
                                      steps=args.steps, batch=args.batch, lr=args.lr,
                                      object_weight=args.object_weight,
                                      position_weight=args.position_weight, log=log)
  t_train = time.time() - t
  log(f"on {HOLD} unseen scenes: dense shape / colour / pattern "
      f"{' / '.join(f'{a:.3f}' for a in acc['dense'])}, object shape "
      f"{float(acc['object_shape']):.3f}, position {float(acc['position']):.3f}")
  tower.save_siglip(os.path.join(args.out, "siglip"), vision, refined)
  if os.path.abspath(args.base) != os.path.abspath(args.out):
    shutil.copytree(os.path.join(args.base, "phi3"), os.path.join(args.out, "phi3"),
                    dirs_exist_ok=True)
  with open(os.path.join(args.out, "refine_log.json"), "w") as f:
    command = " ".join(sys.argv[1:] if argv is None else argv)
    json.dump({"command": f"{PROG} {command}", "args": vars(args), "refine_seed": REFINE_SEED,
               "num_items": len(items), "heldout_scenes": HOLD, "jax": jax.__version__,
               "time_s": {"train": t_train, "total": time.time() - t_all},
               "dense_accuracy": dict(zip(("shape", "colour", "pattern"),
                                          map(float, acc["dense"]))),
               "object_shape_accuracy": float(acc["object_shape"]),
               "position_accuracy": float(acc["position"]),
               "loss": losses[::50] + losses[-1:]}, f, indent=1)
  log(f"wrote {args.out} in {time.time() - t_all:.0f} s")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return build(cli.parse(define_flags, argv, PROG), argv)


if __name__ == "__main__":
  cli.app_main(define_flags, build, PROG)
