"""The synth filter rejects planted bad items with the right reason and keeps good ones."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fusion_jax.synth import measure as M
from fusion_jax.synth import scene as S
from fusion_jax.synth.ask import ProceduralAsker, color_of, count, relation
from fusion_jax.synth.describe import ProceduralDescriber
from fusion_jax.synth.filter import check_item, dedup
from fusion_jax.synth.records import Turn, closed
from fusion_jax.synth.render import ProceduralRenderer

RENDER = ProceduralRenderer()


def _item(category: str, seed: int, size: int = 128):
  rng = np.random.default_rng(seed)
  desc = ProceduralDescriber().describe(category, rng)
  image = RENDER.render(desc, size, rng)
  return desc, ProceduralAsker().ask(desc, rng), image


def _scene(objects, signs=(), category="SynthCount"):
  return S.Description(category=category, caption="planted",
                       panels=(S.Panel(S.FULL_REGION, tuple(objects), tuple(signs)),),
                       background=("beige", "striped"))


def _wrong(turn: Turn, answer: str) -> Turn:
  assert answer != turn.answer and answer in turn.qa["candidates"]
  return dataclasses.replace(turn, answer=answer, qa=dict(turn.qa, answer=answer))


@pytest.mark.parametrize("size", [64, 384])
def test_good_items_of_every_category_pass(size):
  for k, c in enumerate(("SynthColor", "SynthCount", "SynthSpatial", "SynthScene", "SynthText",
                         "SynthMultiChoice", "SynthConvShort", "SynthConvLong",
                         "SynthContrastShort", "SynthContrastLong", "SynthReasoning",
                         "SynthTextQA")):
    for seed in range(3):
      desc, turns, image = _item(c, 100 * k + seed, size)
      assert check_item(desc, turns, image) is None, (c, seed, desc.caption)


def test_planted_wrong_answers_are_caught():
  for seed in range(4):
    desc, turns, image = _item("SynthCount", seed)
    (t,) = turns
    wrong = str(int(t.answer) % 6 + 1)
    assert check_item(desc, [_wrong(t, wrong)], image) == "answer_mismatch"
    desc, turns, image = _item("SynthColor", seed)
    (t,) = turns
    wrong = next(c for c in S.COLORS if c != t.answer)
    assert check_item(desc, [_wrong(t, wrong)], image) == "answer_mismatch"
  # Wrong relation, wrong multiple-choice letter, wrong contrast kind.
  desc, turns, image = _item("SynthSpatial", 7)
  flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
  assert check_item(desc, [_wrong(turns[0], flip[turns[0].answer])], image) == "answer_mismatch"
  desc, turns, image = _item("SynthMultiChoice", 8)
  letter = next(x for x in "ABCD" if x != turns[0].answer)
  assert check_item(desc, [_wrong(turns[0], letter)], image) == "answer_mismatch"
  desc, turns, image = _item("SynthContrastShort", 9)
  other = next(x for x in turns[0].qa["candidates"] if x != turns[0].answer)
  assert check_item(desc, [_wrong(turns[0], other)], image) == "answer_mismatch"


def test_planted_occlusion_is_caught():
  rng = np.random.default_rng(0)
  a = S.Obj("circle", "red", 0.4, 0.5, 0.2)
  b = S.Obj("square", "blue", 0.5, 0.5, 0.15)   # drawn over most of the red circle
  desc = _scene([a, b], category="SynthColor")
  image = RENDER.render(desc, 128, rng)
  assert check_item(desc, [color_of(rng, a)], image) == "occlusion"
  # Fully hidden object of the asked colour, and touching same-colour objects.
  hidden = _scene([S.Obj("square", "green", 0.5, 0.5, 0.3), S.Obj("circle", "red", 0.5, 0.5, 0.1)])
  assert check_item(hidden, [count(rng, 1, "red", None)], RENDER.render(hidden, 128, rng)) \
      == "occlusion"
  touching = _scene([S.Obj("circle", "red", 0.3, 0.5, 0.15),
                     S.Obj("circle", "red", 0.6, 0.5, 0.15)])
  assert check_item(touching, [count(rng, 2, "red", "circle")],
                    RENDER.render(touching, 128, rng)) == "occlusion"
  clipped = _scene([S.Obj("circle", "red", 0.05, 0.5, 0.15)])
  assert check_item(clipped, [count(rng, 1, "red", None)], RENDER.render(clipped, 128, rng)) \
      == "clipped"


def test_pixels_disagreeing_with_the_description_are_caught():
  rng = np.random.default_rng(1)
  drawn = _scene([S.Obj("circle", "red", 0.25, 0.25, 0.12)])
  image = RENDER.render(drawn, 96, rng)
  # The description claims a second object the image does not show.
  claimed = _scene([S.Obj("circle", "red", 0.25, 0.25, 0.12),
                    S.Obj("star", "blue", 0.75, 0.75, 0.12)])
  assert check_item(claimed, [count(rng, 1, "red", None)], image) == "not_visible"
  # Too small to see.
  tiny = _scene([S.Obj("circle", "red", 0.5, 0.5, 0.02)])
  assert check_item(tiny, [count(rng, 1, "red", None)], RENDER.render(tiny, 96, rng)) \
      == "not_visible"
  # Text too small to read at this resolution.
  sign = S.Sign("stop", 0.5, 0.5, 0.3, 0.06)
  small = _scene([], [sign], category="SynthText")
  turn = Turn("What does the sign say?", "stop", closed("stop", "text", S.WORDS, "read"),
              {"op": "text", "sign": sign.bbox, "refs": []})
  assert check_item(small, [turn], RENDER.render(small, 64, rng)) == "text_unreadable"
  big = dataclasses.replace(small, panels=(S.Panel(S.FULL_REGION, (), (S.Sign("stop", 0.5, 0.5,
                                                                              0.7, 0.28),)),))
  assert check_item(big, [turn], RENDER.render(big, 64, rng)) is None


def test_ambiguous_and_degenerate_items_are_caught():
  rng = np.random.default_rng(2)
  a, b = S.Obj("circle", "red", 0.25, 0.25, 0.1), S.Obj("circle", "blue", 0.75, 0.75, 0.1)
  desc = _scene([a, b])
  image = RENDER.render(desc, 96, rng)
  # "the circle" names two objects.
  assert check_item(desc, [color_of(rng, a)], image) == "ambiguous"
  # Diagonal pair: neither left/right nor above/below dominates.
  t = relation(rng, a, b, "left")
  assert check_item(desc, [t], image) == "ambiguous"
  ok = Turn("How many red objects are there?", "1", closed("1", "count", ("1", "2"), "count"))
  assert check_item(desc, [ok], image) is None
  for bad in ([], [Turn("", "1")],
              [Turn("How many?", "7", closed("7", "count", ("1", "2"), "count"))],
              [ok, ok]):
    assert check_item(desc, bad, image) == "degenerate", bad
  blank = np.zeros((96, 96, 3), np.uint8)
  assert check_item(desc, [ok], blank) == "degenerate"


def test_duplicates_are_dropped():
  rec = {"id": "a", "category": "SynthColor", "caption": "c",
         "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]}
  kept, dropped = dedup([rec, dict(rec, id="b"), dict(rec, id="c", caption="other")])
  assert [r["id"] for r in kept] == ["a", "c"] and dropped == 1


def test_shape_classifier_on_rendered_shapes():
  rng = np.random.default_rng(3)
  for size in (64, 384):
    for shape in S.SHAPES:
      desc = _scene([S.Obj(shape, "purple", 0.5, 0.5, 0.2)])
      an = M.Analysis(RENDER.render(desc, size, rng))
      assert [b.shape for b in an.blobs] == [shape], (size, shape)


def test_palette_and_backgrounds_are_far_apart():
  """The margins measure.py relies on (scene.py docstring): colours >= 95 apart, backgrounds
  (and pattern shades) >= 88 from every colour, anti-aliased edges never near a third colour."""
  pal = np.array([S.PALETTE[c] for c in S.COLORS], float)
  d = np.linalg.norm(pal[:, None] - pal[None], axis=-1) + np.eye(len(pal)) * 1e9
  assert d.min() >= 95
  t = np.linspace(0, 1, 41)[:, None]
  for tone in S.BACKGROUND_TONES.values():
    for bg in (np.array(tone, float), np.array(tone, float) + S.PATTERN_SHADE):
      assert np.linalg.norm(pal - bg, axis=-1).min() >= 88
      for i, c in enumerate(pal):
        edge = t * c + (1 - t) * bg
        others = np.delete(pal, i, axis=0)
        assert np.linalg.norm(edge[:, None] - others[None], axis=-1).min() > M.COLOR_TOL + 14
