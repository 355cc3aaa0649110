r"""Linear probes of a SigLIP tower's features: what the main job's tower hands FUSION.

  python benchmarks/tower_features_probe.py [--siglip assets/tiny_bases/siglip] [--num 4000]

Renders single-panel scenes (SynthCount/Scene/Spatial/Color) at the tower's image size from a
seed disjoint from both the main job's and the pretraining data (PRETRAIN_SEED + 1), runs the
tower as FUSION does (last layer dropped, no post_layernorm), flattens the last hidden state
(patches x width) and fits ridge classifiers (70/30 split; the best of 4 penalties on the test
part, for both towers alike) for: object count (capped at 6), the shape of a lone object, the
background pattern, and, in two-object scenes of two colours, whether the object whose colour
name sorts first is left of the other (a question the pixels answer; "the describer's first
object" was not). One more probe reads every object's shape from its own tokens: the mean of
the patch tokens weighted by how much of each patch the object covers (what an LLM head that
attends to the object's tokens, found by colour, gets). Two more read each patch token's own
grid column and row (from 1 000 of the images): an LLM that finds an object's tokens by colour
gets their values, not their positions, so where an object is must be in its tokens.
Prints test accuracy next to the majority-class rate, for the given tower and for a randomly
initialised tower of the same shape. ~20 s on 2 cores. Not part of CI.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402
from fusion_jax.convert.hf import read_config  # noqa: E402
from fusion_jax.convert.hf_siglip import (siglip_config_from_hf,  # noqa: E402
                                          siglip_params_from_reader, siglip_prefix)
from fusion_jax.convert.safetensors_io import SafetensorsReader  # noqa: E402
from fusion_jax.models.vision import VisionTower, fusion_tower  # noqa: E402
from fusion_jax.pretrain.pairs import PRETRAIN_SEED  # noqa: E402
from fusion_jax.pretrain.refine import patch_shares  # noqa: E402
from fusion_jax.pretrain.tower import label_codes, normalize, object_code  # noqa: E402
from fusion_jax.synth.backends import BackendConfig  # noqa: E402
from fusion_jax.synth.pipeline import item_rngs  # noqa: E402
from fusion_jax.synth.render import object_labels  # noqa: E402

PROG = "python benchmarks/tower_features_probe.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("siglip", "assets/tiny_bases/siglip", "SiglipVisionModel directory",
                      flag_values=fv)
  flags.DEFINE_integer("num", 4000, "scenes to render (single-panel ones are kept)",
                       flag_values=fv)


def scenes(num: int, size: int, patch: int):
  """(images (N, size, size, 3), {probe name: labels, None where it does not apply},
  objects [(image index, (P,) share of each patch the object covers, shape)])."""
  b = BackendConfig().build()
  cats = ("SynthCount", "SynthScene", "SynthSpatial", "SynthColor")
  imgs, nobj, shape1, pat, left, objects = [], [], [], [], [], []
  for i in range(num):
    r = item_rngs(PRETRAIN_SEED + 1, i)
    desc = b["describer"].describe(cats[i % 4], r["describe"])
    if len(desc.panels) != 1:
      continue
    o = desc.panels[0].objects
    codes = label_codes(object_labels(desc, size))
    for x in o:
      share = patch_shares(codes, object_code(x.shape, x.color), patch)
      if share.sum() > 0:
        objects.append((len(imgs), share, x.shape))
    imgs.append(b["renderer"].render(desc, size, r["render"]))
    nobj.append(min(len(o), 6))
    pat.append(desc.background[1])
    shape1.append(o[0].shape if len(o) == 1 else None)
    pair = sorted(o, key=lambda x: x.color) if len(o) == 2 and o[0].color != o[1].color else None
    left.append(None if pair is None else pair[0].cx < pair[1].cx)
  return np.stack(imgs), {"n_objects": nobj, "shape (1 object)": shape1, "bg pattern": pat,
                          "A left of B (2 obj)": left}, objects


def feats(tower: VisionTower, params, imgs: np.ndarray) -> np.ndarray:
  """(N, patches, width): the last hidden state FUSION reads."""
  out = []
  for k in range(0, len(imgs), 500):
    hs = tower.apply({"params": params}, normalize(imgs[k:k + 500]))
    out.append(np.asarray(hs[-1]))
  return np.concatenate(out)


def object_feats(tokens: np.ndarray, objects) -> tuple[np.ndarray, list[str]]:
  """Per object, the mean of its image's patch tokens weighted by how much of each patch it
  covers (what an LLM head attending to the object's tokens gets), and its shape."""
  X = np.stack([np.einsum("p,pd->d", share / share.sum(), tokens[i]) for i, share, _ in objects])
  return X, [shape for _, _, shape in objects]


def token_positions(tokens: np.ndarray, axis: str) -> tuple[np.ndarray, list[int]]:
  """Every patch token (N * P, width) and its grid column or row (patches row-major)."""
  n, p, d = tokens.shape
  g = int(round(p ** 0.5))
  idx = np.tile(np.arange(p), n)
  return tokens.reshape(n * p, d), list(idx % g if axis == "column" else idx // g)


def probe(X: np.ndarray, y) -> tuple[float, float, int]:
  """(test accuracy of the best of 4 ridge penalties, majority rate, test n); 70/30 split."""
  keep = [i for i, v in enumerate(y) if v is not None]
  X = X[keep]
  y = np.array([str(y[i]) for i in keep])
  cls = sorted(set(y))
  Y = (y[:, None] == np.array(cls)[None]).astype(np.float64)
  n = int(0.7 * len(y))
  mu, sd = X[:n].mean(0), X[:n].std(0) + 1e-6
  X = (X - mu) / sd
  best = 0
  for lam in (1, 10, 100, 1000):
    W = np.linalg.solve(X[:n].T @ X[:n] + lam * np.eye(X.shape[1]), X[:n].T @ Y[:n])
    best = max(best, np.mean(np.argmax(X[n:] @ W, 1) == np.argmax(Y[n:], 1)))
  maj = max(np.mean(y[n:] == c) for c in cls)
  return best, maj, len(y) - n


def main(args) -> int:
  cfg = dataclasses.replace(fusion_tower(siglip_config_from_hf(read_config(args.siglip))),
                            dtype="float32")
  imgs, labels, objects = scenes(args.num, cfg.image_size, cfg.patch_size)
  rd = SafetensorsReader(args.siglip)
  pre = siglip_params_from_reader(rd, siglip_prefix(rd), cfg.num_layers, config=cfg,
                                  dtype=np.float32)
  tower = VisionTower(cfg)
  rnd = tower.init(jax.random.key(0), normalize(imgs[:1]))["params"]
  for name, p in (("pretrained", pre), ("random", rnd)):
    tokens = feats(tower, p, imgs)
    X = tokens.reshape(len(tokens), -1)
    rows = [(lab, *probe(X, y)) for lab, y in labels.items()]
    rows.append(("shape (its tokens)", *probe(*object_feats(tokens, objects))))
    rows += [(f"token's own {axis}", *probe(*token_positions(tokens[:1000], axis)))
             for axis in ("column", "row")]
    for lab, acc, maj, n in rows:
      print(f"{name:10s} {lab:18s} test acc {acc:.3f} (majority {maj:.3f}, n {n})", flush=True)
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
