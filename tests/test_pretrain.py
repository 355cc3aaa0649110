"""fusion_jax.pretrain: the sigmoid loss, disjoint pretraining data, the shipped base models."""
import hashlib
import os
import re
import sys

import numpy as np
import pytest

from fusion_jax.pretrain import pairs
from fusion_jax.pretrain.siglip import candidate_sigmoid_loss, sigmoid_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASES = os.path.join(ROOT, "assets", "tiny_bases")
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import smoke  # noqa: E402


def _numpy_sigmoid_loss(x, y, t, b):
  n = x.shape[0]
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      total += np.log(1.0 / (1.0 + np.exp(-z * (t * float(x[i] @ y[j]) + b))))
  return -total / n


def test_sigmoid_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 8))
  y = x + 0.3 * rng.normal(size=(5, 8))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  got = float(sigmoid_loss(x.astype(np.float32), y.astype(np.float32),
                           np.float32(np.log(7.0)), np.float32(-2.5)))
  assert got == pytest.approx(_numpy_sigmoid_loss(x, y, 7.0, -2.5), rel=1e-5)
  # Matching pairs give a lower loss than shuffled ones.
  worse = float(sigmoid_loss(x.astype(np.float32), y[::-1].astype(np.float32),
                             np.float32(np.log(7.0)), np.float32(-2.5)))
  assert worse > got


def test_candidate_sigmoid_loss_matches_numpy_reference():
  rng = np.random.default_rng(1)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  x, c = unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(4, 3, 6)))
  answer = np.array([0, 2, 1, 1])
  valid = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]], bool)
  w = np.array([1.0, 0.0, 1.0, 1.0])
  t, b = 5.0, 0.7
  want = 0.0
  for i in range(4):
    for k in range(3):
      z = 1.0 if k == answer[i] else -1.0
      if valid[i, k]:
        want += w[i] * np.log1p(np.exp(-z * (t * float(x[i] @ c[i, k]) + b)))
  f32 = lambda a: a.astype(np.float32)  # noqa: E731
  got = float(candidate_sigmoid_loss(f32(x), f32(c), answer, valid, np.float32(np.log(t)),
                                     np.float32(b), f32(w)))
  assert got == pytest.approx(want / 3, rel=1e-5)


def test_qa_facts_keep_each_closed_turn_with_its_candidates():
  from fusion_jax.pretrain import tower
  img = np.zeros((32, 32, 3), np.uint8)
  items = [
      pairs.Item(img, "c0", (("How many?", "2"), ("Describe.", "a scene")), "SynthCount",
                 (("1", "2", "3"), ())),
      pairs.Item(img, "c1", (("Describe.", "x"),), "SynthConvLong", ((),)),
      pairs.Item(img, "c2", (("Left or right?", "left"),), "SynthSpatial", (("left", "right"),)),
  ]
  vocab = {}
  encode = lambda s: [vocab.setdefault(w, len(vocab) + 1) for w in s.split()]  # noqa: E731
  f = tower.qa_facts(items, encode, 0)
  assert f["item"].tolist() == [0, 2] and f["answer"].tolist() == [1, 0]
  assert f["valid"].tolist() == [[True, True, True], [True, True, False]]
  assert list(f["start"]) == [0, 1, 1, 2]
  decode = {v: k for k, v in vocab.items()}
  text = lambda ids, m: " ".join(decode[i] for i in ids[m])  # noqa: E731
  s = tower.sample_facts(f, np.array([0, 1, 2, 0]), np.random.default_rng(0))
  assert s["weight"].tolist() == [1, 0, 1, 1]
  assert text(s["q_ids"][2], s["q_mask"][2]) == "Left or right?"
  assert [text(s["a_ids"][0, k], s["a_mask"][0, k]) for k in range(3)] == ["1", "2", "3"]
  assert s["answer"][0] == 1 and s["answer"][2] == 0


def test_object_labels_name_what_the_renderer_draws():
  from fusion_jax.synth import scene as S
  from fusion_jax.synth.render import ProceduralRenderer, object_labels
  a = S.Obj("star", "red", 0.3, 0.3, 0.2)
  b = S.Obj("square", "blue", 0.45, 0.4, 0.15)  # drawn over the star's lower right
  desc = S.Description("SynthCount", "x", (S.Panel(S.FULL_REGION, (a, b)),),
                       background=("gray", "plain"))
  img = ProceduralRenderer(noise=False).render(desc, 64, np.random.default_rng(0)).astype(int)
  lab = object_labels(desc, 64)
  star = (1 + S.SHAPES.index("star"), 1 + S.COLORS.index("red"))
  square = (1 + S.SHAPES.index("square"), 1 + S.COLORS.index("blue"))
  for cls, obj in ((star, a), (square, b)):
    m = (lab == cls).all(-1)
    # interior pixels (all 4 neighbours the same object) carry the object's palette colour
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    assert inner.sum() > 20
    diff = np.abs(img[1:-1, 1:-1][inner] - np.array(S.PALETTE[obj.color])).max()
    assert diff <= 2
  assert (lab == square).all(-1).sum() > (lab == star).all(-1).sum() > 0  # paint order
  none = (lab == 0).all(-1)
  assert (img[none] == np.array(S.BACKGROUND_TONES["gray"])).all(-1).mean() > 0.9


def test_patch_labels_take_the_object_covering_most_of_each_patch():
  from fusion_jax.pretrain import tower
  from fusion_jax.synth import scene as S
  lab = np.zeros((16, 16, 2), np.uint8)
  lab[0:2, 0:3] = (1, 1)       # patch 0: 6 px of object (1, 1) < 64 / 8: none
  lab[0:2, 8:13] = (2, 3)      # patch 1: 10 px of (2, 3) ...
  lab[4:8, 8:13] = (4, 5)      # ... and 20 px of (4, 5): the larger wins
  lab[8:16, 8:16] = (5, 8)     # patch 3: fully covered
  img = np.zeros((16, 16, 3), np.uint8)
  items = [pairs.Item(img, "c", (), "SynthScene", object_labels=lab,
                      pattern=S.PATTERNS.index("dotted")),
           pairs.Item(img, "c", (), "SynthScene")]
  got = tower.patch_labels(items, 8)
  assert got.shape == (2, 4, 3)
  dotted = S.PATTERNS.index("dotted")
  assert got[0].tolist() == [[0, 0, dotted], [4, 5, dotted], [0, 0, dotted], [5, 8, dotted]]
  assert (got[1] == -1).all()  # no labels, unknown pattern: ignored by dense_loss


def test_dense_loss_ignores_unknown_targets_and_scores_objects_only():
  from fusion_jax.pretrain import tower
  c = tower.DENSE_CLASSES
  logits = np.zeros((1, 2, sum(c)), np.float32)
  logits[0, 0, 2] = 5.0                  # patch 0: shape class 2 (the target)
  logits[0, :, c[0] + 0] = 5.0           # colour "none" everywhere (patch 1's target is 3)
  logits[0, :, c[0] + c[1] + 1] = 5.0    # pattern 1 everywhere
  labels = np.array([[[2, -1, 1], [0, 3, -1]]], np.int32)
  loss, acc = tower.dense_loss(logits, labels)
  lse = lambda k, hit: np.log(np.exp(5.0) + k - 1) - (5.0 if hit else 0.0)  # noqa: E731
  # shape: patch 0 hits, patch 1 (target "none") has flat logits; shape and colour add their
  # mean over the object patches (shape: patch 0, colour: patch 1)
  want = ((lse(c[0], True) + np.log(c[0])) / 2 + lse(c[0], True)
          + 2 * lse(c[1], False) + lse(c[2], True))
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # shape: only patch 0 has an object (right); colour: patch 1 (wrong); pattern: patch 0
  assert np.asarray(acc).tolist() == [1.0, 0.0, 1.0]


def _main_job_hashes(n: int) -> set[str]:
  """Image hashes of the main job's items 0..n-1 (its train and held-out splits are drawn from
  these indices with config.synth.seed; fusion_jax/synth/pipeline.py)."""
  from fusion_jax.synth.backends import BackendConfig
  from fusion_jax.synth.pipeline import item_rngs
  c = smoke.get_config()
  b = BackendConfig().build()
  out = set()
  for i in range(n):
    cat = c.synth.categories[i % len(c.synth.categories)]
    rngs = item_rngs(int(c.synth.seed), i)
    desc = b["describer"].describe(cat, rngs["describe"])
    out.add(pairs.image_hash(b["renderer"].render(desc, int(c.synth.size), rngs["render"])))
  return out


def test_pretraining_data_is_disjoint_from_the_main_job():
  c = smoke.get_config()
  assert int(c.synth.seed) != pairs.PRETRAIN_SEED
  with pytest.raises(ValueError, match="main job"):
    pairs.build_items(1, smoke.CATEGORIES, 32, seed=0)
  main = _main_job_hashes(200)
  items = pairs.build_items(200, tuple(c.synth.categories), int(c.synth.size))
  mine = {pairs.image_hash(it.image) for it in items}
  assert len(mine) == 200 and not (mine & main)
  # The same seed reproduces the same scenes, and `exclude` drops listed images.
  again = pairs.build_items(3, tuple(c.synth.categories), int(c.synth.size))
  assert [pairs.image_hash(it.image) for it in again] == \
      [pairs.image_hash(it.image) for it in items[:3]]
  skip = pairs.build_items(3, tuple(c.synth.categories), int(c.synth.size),
                           exclude={pairs.image_hash(items[0].image)})
  assert pairs.image_hash(items[0].image) not in {pairs.image_hash(it.image) for it in skip}


def _listed_sha256() -> dict[str, str]:
  with open(os.path.join(BASES, "README.md")) as f:
    return dict((m.group(2), m.group(1)) for m in
                re.finditer(r"^([0-9a-f]{64})  (\S+)$", f.read(), re.M))


def test_shipped_bases_match_listed_sha256_and_size():
  listed = _listed_sha256()
  assert {"siglip/model.safetensors", "phi3/model.safetensors", "phi3/tokenizer.model",
          "siglip/config.json", "phi3/config.json"} <= set(listed)
  total = 0
  for rel, digest in listed.items():
    with open(os.path.join(BASES, rel), "rb") as f:
      data = f.read()
    total += len(data)
    assert hashlib.sha256(data).hexdigest() == digest, rel
  assert total <= 20 * 2**20


def test_shipped_bases_import_as_the_main_job_expects(tmp_path):
  from fusion_jax.convert import import_hf
  from fusion_jax.convert.model_dir import load_model_config
  from fusion_jax.task.fusion import fusion_config_from
  c = smoke.get_config()
  out = str(tmp_path / "base")
  assert import_hf.main(["--llm", c.base.llm, "--vision", c.base.vision, "--preset",
                         c.base.preset, "--out", out]) == 0
  got = load_model_config(out)
  want = fusion_config_from(c.model)
  for k in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers",
            "num_heads"):
    assert getattr(got.vision, k) == getattr(want.vision, k), k
  for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "arch"):
    assert getattr(got.llm, k) == getattr(want.llm, k), k
  assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.model"))


def test_object_targets_weight_each_objects_patches():
  from fusion_jax.pretrain import refine
  lab = np.zeros((16, 16, 2), np.uint8)
  lab[0:8, 0:4] = (2, 1)       # object A (shape 2): 32 px in patch 0
  lab[0:8, 8:16] = (2, 1)      # ... and 64 px in patch 1
  lab[8:16, 8:12] = (5, 3)     # object B (shape 5): patch 3 only
  items = [pairs.Item(np.zeros((16, 16, 3), np.uint8), "c", (), "SynthScene",
                      object_labels=lab)]
  w, y = refine.object_targets(items, 8)
  assert w.shape == (1, refine.MAX_OBJECTS, 4) and y.shape == (1, refine.MAX_OBJECTS)
  assert y[0, :3].tolist() == [2, 5, -1]
  np.testing.assert_allclose(w[0, 0], [1 / 3, 2 / 3, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(w[0, 1], [0, 0, 0, 1])
  assert (w[0, 2:] == 0).all()


def test_refine_trains_the_tower_it_was_given():
  import jax
  from fusion_jax.models.vision import VisionConfig, VisionTower
  from fusion_jax.pretrain import refine, tower
  items = pairs.build_items(12, ("SynthCount", "SynthScene"), 32, seed=refine.REFINE_SEED)
  vision = VisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                        num_layers=2, num_heads=2, dtype="float32")
  images = np.stack([it.image for it in items])
  start = jax.tree.map(np.asarray, VisionTower(vision).init(
      jax.random.key(0), tower.normalize(images[:1]))["params"])
  w, y = refine.object_targets(items, 8)
  out, acc, losses = refine.refine_tower(vision, start, images, tower.patch_labels(items, 8), w,
                                         y, steps=3, batch=4, hold=4, position_weight=1.0,
                                         log=lambda _: None)
  assert jax.tree.structure(out) == jax.tree.structure(start)
  assert len(losses) == 3 and np.isfinite(losses).all()
  assert 0.0 <= float(acc["object_shape"]) <= 1.0 and acc["dense"].shape == (3,)
  assert 0.0 <= float(acc["position"]) <= 1.0
  # Every parameter of the layers FUSION reads moved (the last layer only decays: import_hf
  # drops it, as the loss does).
  read = {k: v for k, v in start.items() if k not in (f"layers_{vision.num_layers - 1}",
                                                      "post_layernorm")}
  assert set(read) == {"embeddings", "layers_0"}
  for a, b in zip(jax.tree.leaves({k: out[k] for k in read}), jax.tree.leaves(read)):
    assert not np.array_equal(a, b)


def test_position_loss_names_each_tokens_row_and_column():
  import jax.numpy as jnp
  from fusion_jax.pretrain import refine
  g = 3
  idx = np.arange(g * g)
  right = np.zeros((2, g * g, 2 * g), np.float32)
  right[:, idx, idx // g] = 20.0        # row logits
  right[:, idx, g + idx % g] = 20.0     # column logits
  loss, acc = refine.position_loss(jnp.asarray(right), g)
  assert float(acc) == 1.0 and float(loss) < 1e-6
  swapped = right[:, ::-1]              # every token names another token's place (bar the centre)
  loss, acc = refine.position_loss(jnp.asarray(swapped), g)
  assert abs(float(acc) - 1 / (g * g)) < 1e-6 and float(loss) > 10.0
  flat = np.zeros_like(right)           # no preference: log(g) per axis
  loss, _ = refine.position_loss(jnp.asarray(flat), g)
  np.testing.assert_allclose(float(loss), 2 * np.log(g), rtol=1e-6)


def test_refine_scenes_are_disjoint_from_the_main_job():
  from fusion_jax.pretrain import refine
  c = smoke.get_config()
  assert refine.REFINE_SEED not in (int(c.synth.seed), pairs.PRETRAIN_SEED)
  items = pairs.build_items(200, tuple(c.synth.categories), int(c.synth.size),
                            seed=refine.REFINE_SEED)
  assert not ({pairs.image_hash(it.image) for it in items} & _main_job_hashes(200))
