"""fusion_jax.synth: determinism, valid records for every category, data-pipeline acceptance,
answer balance, and ground truth recovered from pixels by an independent check."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from fusion_jax.synth import __main__ as cli
from fusion_jax.synth import filter as F
from fusion_jax.synth import records as R
from fusion_jax.synth import scene as S
from fusion_jax.synth.categories import CATEGORIES
from fusion_jax.synth.pipeline import SynthConfig, synthesize
from fusion_jax.synth.render import encode_png
from fusion_jax.synth.stats import answer_stats, format_stats, widest_group
from synth_records import read_arrayrecord, validate_record

NUM = 8 * len(CATEGORIES)


def _hashes(out: str) -> dict[str, str]:
  files = {}
  for root, _, names in os.walk(out):
    for n in names:
      p = os.path.join(root, n)
      with open(p, "rb") as f:
        files[os.path.relpath(p, out)] = hashlib.sha256(f.read()).hexdigest()
  return files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A small dataset of every category at 64 px (the main job's scale), via the CLI."""
  out = str(tmp_path_factory.mktemp("synth") / "a")
  assert cli.main(["--out", out, "--num", str(NUM), "--seed", "3", "--size", "64",
                   "--arrayrecord", "--quiet"]) == 0
  return out


def _load(out: str, name: str) -> list[dict]:
  with open(os.path.join(out, name)) as f:
    return json.load(f)


def test_same_seed_is_byte_identical_for_any_worker_count(dataset, tmp_path):
  other = str(tmp_path / "b")
  synthesize(SynthConfig(out=other, num=NUM, seed=3, size=64, workers=2, arrayrecord=True,
                         progress=False))
  a, b = _hashes(dataset), _hashes(other)
  assert a == b
  assert sum(k.startswith("images/") for k in a) == NUM
  third = str(tmp_path / "c")
  synthesize(SynthConfig(out=third, num=24, seed=4, size=64, progress=False,
                         categories=("SynthColor", "SynthCount")))
  assert _hashes(third)["train.json"] != a["train.json"]
  with pytest.raises(FileExistsError, match="--overwrite"):
    synthesize(SynthConfig(out=third, num=24, seed=4, size=64, progress=False))


def test_every_category_gives_valid_records(dataset):
  train, heldout = _load(dataset, "train.json"), _load(dataset, "heldout.json")
  recs = train + heldout
  assert len(recs) == NUM and len({r["id"] for r in recs}) == NUM
  assert [r["id"] for r in train] == sorted(r["id"] for r in train)
  counts = collections.Counter(r["category"] for r in recs)
  assert counts == {c: NUM // len(CATEGORIES) for c in CATEGORIES}
  assert set(r["category"] for r in heldout) == set(CATEGORIES)
  for r in recs:
    validate_record(r)
    assert os.path.isfile(os.path.join(dataset, r["image"]))
    assert Image.open(os.path.join(dataset, r["image"])).size == (64, 64)
  # Closed questions everywhere, open ones where the category is meant to have them.
  for c in CATEGORIES:
    qa = [q for r in recs if r["category"] == c for q in r["qa"]]
    assert any(q is not None for q in qa), c
    if c in ("SynthConvLong", "SynthContrastLong"):
      assert any(q is None for q in qa), c
  multi = [r for r in recs if r["category"] in ("SynthConvShort", "SynthConvLong")]
  assert all(len(r["conversations"]) >= 4 for r in multi)
  mc = [q for r in recs if r["category"] == "SynthMultiChoice" for q in r["qa"]]
  assert all(q["candidates"] == ["A", "B", "C", "D"] and len(q["options"]) == 4 for q in mc)
  stats = json.load(open(os.path.join(dataset, "stats.json")))
  assert stats["records"] == NUM and set(stats["categories"]) == set(CATEGORIES)
  assert set(stats["rejected"]) == set(F.REASONS)
  for c, s in stats["categories"].items():
    assert 0 < s["chance"] < 1 and s["majority_rate"] >= s["chance"] - 1e-9, c
  assert "majority" in open(os.path.join(dataset, "stats.txt")).read()


def test_conversations_do_not_leak_answers_into_later_turns(dataset):
  """A closed answer is never readable from the conversation before it."""
  recs = _load(dataset, "train.json") + _load(dataset, "heldout.json")
  checked = 0
  for r in recs:
    conv = r["conversations"]
    for k, q in enumerate(r["qa"]):
      if q is None:
        continue
      before = " ".join(m["value"] for m in conv[:2 * k])
      question = conv[2 * k]["value"]
      if q["kind"] == "color_of" and k > 0:
        shape = next(s for s in S.SHAPES if s in question)
        assert f"{q['answer']} {shape}" not in before, (r["id"], k)
        checked += 1
      elif q["kind"] == "shape_of" and k > 0:
        colour = next(c for c in S.COLORS if c in question)
        assert f"{colour} {q['answer']}" not in before, (r["id"], k)
        checked += 1
      elif q["kind"] == "exists" and q["answer"] == "yes":
        colour = next(c for c in S.COLORS if c in question)
        assert colour not in before, (r["id"], k)
        checked += 1
    if r["category"] == "SynthContrastLong":
      assert r["qa"][0] is not None and r["qa"][-1] is None  # closed before the description
  assert checked >= 5


def test_data_pipeline_accepts_json_and_arrayrecord(dataset, tmp_path):
  from fusion_jax.data import pipeline as pl
  from fusion_jax.data import mixture
  from fusion_jax.data.tokenizer import load_tokenizer
  from fusion_jax.data.tokenizer_train import train_sentencepiece

  recs = _load(dataset, "train.json") + _load(dataset, "heldout.json")
  texts = [m["value"].replace("<image>\n", "") for r in recs for m in r["conversations"]]
  train_sentencepiece(texts, str(tmp_path / "tok" / "tokenizer"), 400)
  tok = load_tokenizer(str(tmp_path / "tok"))
  cfg = dict(image_size=28, num_image_tokens=4, seq_len=2048, max_questions=8,
             max_instruct_len=1024, query_len=(1,), batch_size=4, read_threads=1,
             read_buffer=4, prefetch=0, strict=True)
  for name, paths in (("json", (os.path.join(dataset, "train.json"),
                                os.path.join(dataset, "heldout.json"))),
                      ("arrayrecord", (os.path.join(dataset, "train.array_record"),
                                       os.path.join(dataset, "heldout.array_record")))):
    it = pl.make_pipeline(dict(cfg, paths=paths, image_root=dataset), tok, process_index=0,
                          process_count=1, train=False)
    n = 0
    for b in it:
      n += int(b["has_image"].sum())
      assert (b["labels"][b["has_image"][:, 0]] != -100).any(axis=1).all()
    assert n == NUM, name
    assert it.skip_counters() == {}, name
  # The ArrayRecord entries hold the same records and the image files' bytes.
  src = mixture.source_from_paths([os.path.join(dataset, "train.array_record")])
  got = list(read_arrayrecord(os.path.join(dataset, "train.array_record")))
  assert len(got) == len(src) == len(_load(dataset, "train.json"))
  rec, img = got[0]
  assert rec == _load(dataset, "train.json")[0]
  assert img == open(os.path.join(dataset, rec["image"]), "rb").read()


def test_answers_are_balanced(dataset):
  recs = _load(dataset, "train.json") + _load(dataset, "heldout.json")
  groups = collections.defaultdict(collections.Counter)
  for r in recs:
    q = F.primary_qa(r)
    groups[F.group_key(r)][q["answer"]] += 1
  for key, cnt in groups.items():
    # The stated rule holds on the written dataset (quota truncation keeps it).
    n = sum(cnt.values())
    assert max(cnt.values()) <= math.ceil(F.BALANCE_RATIO * n / len(key[2])) + 1, (key, cnt)
  stats = json.load(open(os.path.join(dataset, "stats.json")))
  for c, s in stats["categories"].items():
    for g, gs in s["primary_groups"].items():
      assert gs["max_share"] <= gs["bound"] + 1.0 / gs["n"], (c, g, gs)

  # The balancer on a skewed pool: 70% "yes" -> capped; the rule's bound holds.
  pool = []
  for i in range(200):
    a = "yes" if i % 10 < 7 else "no"
    pool.append({"id": f"x{i:04d}", "category": "SynthReasoning", "conversations": [],
                 "qa": [R.closed(a, "yes_no", ("yes", "no"), "more")]})
  kept, dropped = F.balance(pool)
  cnt = collections.Counter(F.primary_qa(r)["answer"] for r in kept)
  assert dropped > 0 and max(cnt.values()) <= math.ceil(1.25 * len(kept) / 2)
  s = answer_stats(kept)
  assert s["majority_rate"] <= 1.25 * s["chance"] + 1.0 / len(kept)
  # A majority-answer rate of 0.7 before balancing: the stats report it.
  assert answer_stats(pool)["majority_rate"] == pytest.approx(0.7)

  # Later turns, which the balancer does not see: 70 % "no" behind balanced first turns is the
  # widest group, and stats.txt names it.
  convs = [{"category": "SynthConvShort", "conversations": [],
            "qa": [R.closed("yes" if i % 2 else "no", "yes_no", ("yes", "no"), "exists"),
                   R.closed("no" if i % 10 < 7 else "yes", "yes_no", ("yes", "no"), "exists")]}
           for i in range(100)]
  assert widest_group(convs) == {"group": "yes_no|yes,no|later", "n": 100, "answer": "no",
                                 "share": 0.7, "uniform": 0.5, "excess": 0.2}
  assert widest_group(convs[:20]) is None  # under 30 questions per group
  assert "widest" in open(os.path.join(dataset, "stats.txt")).read().splitlines()[3]
  stats = json.load(open(os.path.join(dataset, "stats.json")))
  stats["categories"]["SynthConvShort"]["widest_group"] = widest_group(convs)
  assert ("widest overall: SynthConvShort, yes_no (later turns): 'no' 0.700 of 100 against "
          "0.500") in format_stats(stats)


# ---- independent pixel check (no fusion_jax.synth.measure code) ----

def _components(image: np.ndarray, tol: float = 40.0, min_px: int = 4):
  """[(colour name, pixel count)] of 8-connected regions near a palette colour (BFS)."""
  names = list(S.PALETTE)
  pal = np.array([S.PALETTE[n] for n in names], float)
  d = np.linalg.norm(image[:, :, None, :].astype(float) - pal[None, None], axis=-1)
  lab = np.where(d.min(-1) < tol, d.argmin(-1), -1)
  h, w = lab.shape
  seen = np.zeros((h, w), bool)
  out = []
  for y in range(h):
    for x in range(w):
      if lab[y, x] < 0 or seen[y, x]:
        continue
      c, stack, n = lab[y, x], [(y, x)], 0
      seen[y, x] = True
      while stack:
        cy, cx = stack.pop()
        n += 1
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            ny, nx = cy + dy, cx + dx
            if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and lab[ny, nx] == c:
              seen[ny, nx] = True
              stack.append((ny, nx))
      if n >= min_px:
        out.append((names[c], n))
  return out


def test_count_and_colour_ground_truth_from_pixels(dataset, tmp_path):
  recs = _load(dataset, "train.json") + _load(dataset, "heldout.json")
  # At 64 px (the dataset) and, for a few items, at the default 384 px (subsampled by 3).
  big = str(tmp_path / "big")
  synthesize(SynthConfig(out=big, num=8, seed=5, size=384, progress=False,
                         categories=("SynthColor", "SynthCount"), heldout_fraction=0.0))
  checked = collections.Counter()
  for root, rs, step in ((dataset, recs, 1), (big, _load(big, "train.json"), 3)):
    for r in rs:
      if r["category"] not in ("SynthColor", "SynthCount"):
        continue
      img = np.asarray(Image.open(os.path.join(root, r["image"])).convert("RGB"))[::step, ::step]
      comps = _components(img)
      q, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
      if r["category"] == "SynthColor":
        assert len(comps) == 1 and comps[0][0] == answer, (r["id"], comps, answer)
      else:
        colour = next(c for c in S.COLORS if f" {c} " in q)
        assert sum(c == colour for c, _ in comps) == int(answer), (r["id"], comps, q, answer)
      checked[r["category"]] += 1
  assert checked["SynthColor"] >= 10 and checked["SynthCount"] >= 10


def test_png_writer_roundtrip_and_jpeg_option(tmp_path):
  rng = np.random.default_rng(0)
  for shape in ((1, 1, 3), (37, 50, 3), (64, 64, 3)):
    a = rng.integers(0, 256, size=shape, dtype=np.uint8)
    b = np.asarray(Image.open(io.BytesIO(encode_png(a))).convert("RGB"))
    assert np.array_equal(a, b)
  out = str(tmp_path / "jpg")
  synthesize(SynthConfig(out=out, num=4, seed=0, size=64, image_format="jpeg", progress=False,
                         categories=("SynthColor",)))
  recs = _load(out, "train.json") + _load(out, "heldout.json")
  assert all(r["image"].endswith(".jpg") for r in recs)
  assert Image.open(os.path.join(out, recs[0]["image"])).format == "JPEG"


def test_caption_alignment_style(tmp_path):
  out = str(tmp_path / "cap")
  cli.main(["--out", out, "--num", "10", "--size", "64", "--categories", "alignment",
            "--alignment-style", "caption", "--quiet"])
  recs = _load(out, "train.json") + _load(out, "heldout.json")
  assert len(recs) == 10 and all(r["qa"] == [None] for r in recs)
  assert all(r["conversations"][1]["value"] == r["caption"] for r in recs)


def test_yes_no_is_balanced_in_every_turn():
  # The balancer sees first closed questions only; later conversation turns are balanced by
  # construction. A "no" asked where a "yes" could not be made skewed them to 58 % "no".
  from fusion_jax.synth.ask import ProceduralAsker
  from fusion_jax.synth.describe import ProceduralDescriber
  describer, asker = ProceduralDescriber(), ProceduralAsker()
  answers = collections.defaultdict(collections.Counter)
  rng = np.random.default_rng(7)
  for cat in ("SynthConvShort", "SynthConvLong"):
    for _ in range(1500):
      closed = [t.qa for t in asker.ask(describer.describe(cat, rng), rng) if t.qa is not None]
      for i, qa in enumerate(closed):
        if qa["answer_type"] == "yes_no":
          answers["first" if i == 0 else "later"][qa["answer"]] += 1
  for turn, cnt in answers.items():
    n = sum(cnt.values())
    assert n > 400 and abs(cnt["yes"] / n - 0.5) < 0.04, (turn, cnt)
