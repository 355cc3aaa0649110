"""Generation: prefill + KV-cached decode agrees with the full forward on prompt + answer."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fusion_jax.infer import generate as gen_lib
from fusion_jax.infer import generator as generator_lib
from fusion_jax.infer import sampling as sampling_lib
from fusion_jax.models import fusion
from fusion_jax.models.presets import TINY
from tests.generate_helpers import make_generate, prompt_batch
from tests.pipeline_fixtures import make_tokenizer

SEQ, LQ, Q, NEW = 128, 2, 4, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gen"))
  tok = make_tokenizer(root)
  cfg = dataclasses.replace(TINY, llm=TINY.llm.replace(vocab_size=len(tok), pad_token_id=tok.pad_id,
                                                       initializer_range=0.5),
                            template="phi_3")
  batch = fusion.example_batch(cfg, batch_size=2, seq_len=SEQ, max_questions=LQ, q=Q)
  params = jax.jit(lambda k: nn.meta.unbox(fusion.init(k, cfg, batch)["params"]))(jax.random.key(0))
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  Image.new("RGB", (40, 30), (200, 10, 10)).save(os.path.join(root, "img", "a.png"))
  Image.new("RGB", (32, 32), (10, 10, 200)).save(os.path.join(root, "img", "b.png"))
  records = [  # unequal prompt lengths, a second question, a text-only prompt
      {"id": "a", "image": "img/a.png",
       "conversations": [{"from": "human", "value": "<image>\nWhat color is the ball?"}]},
      {"id": "b", "image": "img/b.png",
       "conversations": [{"from": "human", "value": "<image>\nHow many cats?"},
                         {"from": "gpt", "value": "3"},
                         {"from": "human", "value": "Is the ball red?"}]},
      {"id": "c", "conversations": [{"from": "human", "value": "Describe a cat."}]},
  ]
  prompts = prompt_batch(records, tok, cfg, image_root=root, q=Q, seq_len=SEQ,
                                 max_questions=LQ)
  return root, tok, cfg, params, records, prompts


def _full_forward_logits(params, cfg, prompts, tokens):
  """Logits of one full forward over each prompt followed by its generated tokens (B, NEW, V)."""
  b, s = prompts["input_ids"].shape
  full = {k: np.asarray(v) for k, v in prompts.items()}
  pad = lambda a, fill: np.concatenate([a, np.full((b, NEW), fill, a.dtype)], axis=1)  # noqa: E731
  full["input_ids"] = pad(full["input_ids"], 0)
  full["token_mask"] = pad(full["token_mask"], False)
  full["positions"] = pad(full["positions"], 0)
  full["labels"] = pad(full["labels"], -100)
  if "segment_ids" in full:  # the batch contract's segment ids (one sample per row)
    full["segment_ids"] = pad(full["segment_ids"], 0)
  lens = prompts["token_mask"].sum(-1)
  for i in range(b):
    n = lens[i]
    full["input_ids"][i, n:n + NEW] = tokens[i]
    full["token_mask"][i, n:n + NEW] = True
    if "segment_ids" in full:
      full["segment_ids"][i, n:n + NEW] = 1
    full["positions"][i, n:n + NEW] = np.arange(n, n + NEW)
  logits, _ = fusion.apply(params, full, cfg, train=False)
  idx = lens[:, None] - 1 + np.arange(NEW)[None]  # logits that predict generated token t
  return np.take_along_axis(np.asarray(logits), idx[..., None], axis=1)


def test_cached_greedy_matches_full_forward(setup):
  _, tok, cfg, params, _, prompts = setup
  gen = make_generate(cfg, max_new_tokens=NEW, stop=(), pad_id=tok.pad_id)
  tokens, lengths = jax.device_get(gen(params, prompts, jax.random.key(0)))
  assert tokens.shape == (3, NEW) and lengths.tolist() == [NEW] * 3
  ref = _full_forward_logits(params, cfg, prompts, tokens)
  chosen = np.take_along_axis(ref, tokens[..., None], axis=-1)[..., 0]
  # Every cached greedy step picked the full forward's argmax (up to float noise) ...
  np.testing.assert_allclose(chosen, ref.max(-1), atol=1e-4)
  # ... and the answers differ between prompts (the prompt reached the cache).
  assert len({tuple(t) for t in tokens.tolist()}) > 1


def test_prefill_logits_match_full_forward(setup):
  _, _, cfg, params, _, prompts = setup
  from fusion_jax.models.llm import init_cache
  cache = init_cache(cfg.llm, 3, SEQ + NEW)
  logits, cache = fusion.prefill(params, prompts, cfg, cache)
  ref, _ = fusion.apply(params, prompts, cfg, train=False)
  mask = np.asarray(prompts["token_mask"])
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref)[mask], atol=1e-5)
  assert np.asarray(cache["index"]).tolist() == mask.sum(-1).tolist()
  # What the generator asks for: each row's last prompt token only, the head on B tokens.
  last_pos = jnp.asarray(mask.sum(-1) - 1)
  fn = jax.jit(lambda p, b, c: fusion.prefill(p, b, cfg, c, logits_at=last_pos))
  last, _ = fn(params, prompts, init_cache(cfg.llm, 3, SEQ + NEW))
  assert last.shape == (3, cfg.llm.vocab_size)
  want = np.asarray(logits)[np.arange(3), last_pos]
  # The head's matmul on 3 rows sums in another order than on 3 x 128 (logits up to ~13 here).
  np.testing.assert_allclose(np.asarray(last), want, atol=1e-5 * np.abs(want).max())
  v = cfg.llm.vocab_size
  hlo = fn.lower(params, prompts, init_cache(cfg.llm, 3, SEQ + NEW)).compile().as_text()
  assert f"f32[3,{SEQ},{v}]" not in hlo  # no (B, S, V) logits in the compiled prefill
  whole = jax.jit(lambda p, b, c: fusion.prefill(p, b, cfg, c))
  assert f"f32[3,{SEQ},{v}]" in whole.lower(params, prompts, init_cache(cfg.llm, 3, SEQ + NEW)
                                            ).compile().as_text()


def test_stop_token_ends_each_answer(setup):
  _, tok, cfg, params, _, prompts = setup
  free = make_generate(cfg, max_new_tokens=NEW, stop=(), pad_id=tok.pad_id)
  tokens, _ = jax.device_get(free(params, prompts, jax.random.key(0)))
  stop = int(tokens[0, 2])  # example 0 stops at its third token
  gen = make_generate(cfg, max_new_tokens=NEW, stop=(stop,), pad_id=tok.pad_id)
  out, lengths = jax.device_get(gen(params, prompts, jax.random.key(0)))
  for i in range(3):
    first = next((t for t in range(NEW) if tokens[i, t] == stop), NEW)
    assert lengths[i] == first
    np.testing.assert_array_equal(out[i, :first], tokens[i, :first])
    assert (out[i, first:] == tok.pad_id).all()


def test_answer_decodes_text_and_sampling_is_seeded(setup):
  root, tok, cfg, params, records, _ = setup
  kw = dict(image_root=root, q=Q, seq_len=SEQ, max_questions=LQ, max_new_tokens=NEW,
            batch_size=2)  # 3 prompts: the last batch is padded by repetition
  greedy = gen_lib.answer(params, cfg, tok, records, **kw)
  assert len(greedy) == 3 and all(isinstance(a, str) for a in greedy)
  def hot(seed):
    return gen_lib.answer(params, cfg, tok, records, temperature=1.0, seed=seed, **kw)
  assert hot(1) == hot(1)


def test_prompt_that_does_not_fit_names_the_record(setup):
  root, tok, cfg, _, records, _ = setup
  with pytest.raises(ValueError, match=r"^b: .*seq_len=.*raise them"):
    prompt_batch(records[1:2], tok, cfg, image_root=root, q=Q, seq_len=SEQ,
                         max_questions=1)


# ----------------------------------------------------------------------------- Generator


def test_sample_tokens_top_k_top_p():
  n = 256
  logits = np.log(np.array([[0.6, 0.3, 0.1, 1e-9]] * n, np.float32))
  keys = jax.vmap(jax.random.key)(np.arange(n, dtype=np.uint32))
  sample = jax.jit(sampling_lib.sample_tokens)

  def draws(temperature, top_k, top_p):
    return set(np.asarray(sample(logits, np.full(n, temperature, np.float32),
                                 np.full(n, top_k, np.int32), np.full(n, top_p, np.float32),
                                 keys)).tolist())

  assert draws(0.0, 0, 1.0) == {0}  # greedy
  assert draws(1.0, 0, 1.0) == {0, 1, 2}
  assert draws(1.0, 2, 1.0) == {0, 1}  # top-k
  assert draws(1.0, 0, 0.85) == {0, 1}  # mass before token 2 is 0.9 >= 0.85
  assert draws(1.0, 0, 0.5) == {0}
  assert draws(1.0, 1, 1.0) == {0}
  # Per-row settings in one batch: greedy rows take the argmax, the others sample.
  mixed = np.asarray(sample(logits, np.arange(n) % 2 * 1.0, np.zeros(n, np.int32),
                            np.ones(n, np.float32), keys))
  assert set(mixed[::2].tolist()) == {0} and len(set(mixed[1::2].tolist())) == 3


@pytest.fixture(scope="module")
def generator(setup):
  _, tok, cfg, params, _, _ = setup
  return generator_lib.Generator(params, cfg, tok, q=Q, max_questions=LQ, max_seq_len=SEQ,
                           max_batch=4, max_new_tokens=NEW, stop_check_every=2)


def test_mixed_lengths_batch_equals_alone(setup, generator):
  root, _, _, _, records, prompts = setup
  lengths = prompts["token_mask"].sum(-1)
  assert len(set(lengths.tolist())) == 3  # three different prompt lengths
  sp = sampling_lib.SamplingParams(max_new_tokens=NEW)
  together = generator.generate(records, sp, image_root=root)
  for rec, got in zip(records, together):
    alone = generator.generate([rec], sp, image_root=root)[0]
    assert got == alone
  assert len({c.token_ids for c in together}) > 1
  assert all(c.prompt_tokens == n for c, n in zip(together, lengths))
  # Per-row max_new_tokens in one batch.
  short = generator.generate(records, [sp, sampling_lib.SamplingParams(max_new_tokens=2), sp],
                             image_root=root)
  assert short[0] == together[0] and short[2] == together[2]
  assert short[1].token_ids == together[1].token_ids[:2] and short[1].completion_tokens <= 2


def test_stop_strings_cut_the_text(setup, generator):
  root, tok, _, _, records, _ = setup
  free = generator.generate(records[:1], sampling_lib.SamplingParams(max_new_tokens=NEW),
                            image_root=root)[0]
  ids = list(free.token_ids)
  decode = lambda k: tok.decode(ids[:k], skip_special_tokens=True)  # noqa: E731
  # A stop string: the text the k-th generated token appends (absent from the text before).
  found = [(k, decode(k)[len(decode(k - 1)):]) for k in range(2, len(ids) + 1)
           if decode(k).startswith(decode(k - 1)) and len(decode(k)) > len(decode(k - 1))
           and decode(k)[len(decode(k - 1)):] not in decode(k - 1)]
  assert found, f"no usable stop string in the free answer {ids}"
  k, stop = found[0]
  got = generator.generate(records[:1],
                           sampling_lib.SamplingParams(max_new_tokens=NEW, stop=(stop,)),
                           image_root=root)[0]
  assert got.finish_reason == "stop"
  assert got.text == decode(k)[:decode(k).find(stop)].strip()
  assert got.completion_tokens == k and got.token_ids == tuple(ids[:k])


def test_text_stream_deltas_join_to_the_final_text():
  stream = sampling_lib.TextStream(stop=("END", "##"))
  grown = ["  The", "  The cat #", "  The cat #1 ", "  The cat #1 sat E", "  The cat #1 sat EN",
           "  The cat #1 sat ENd\ufffd", "  The cat #1 sat ENd\u00e9 and END more"]
  deltas = [stream.update(t) for t in grown]
  # Held back: a tail that may begin a stop string, trailing spaces, an incomplete character.
  assert deltas == ["The", " cat", " #1", " sat", "", " ENd", "\u00e9 and"]
  final = sampling_lib.answer_text(grown[-1], stream.stop)
  assert "".join(deltas) + stream.finish(final) == final == "The cat #1 sat ENd\u00e9 and"
  assert stream.finish(final) == "" and stream.update("The cow") == ""  # never taken back


def test_on_text_streams_each_answer_and_changes_nothing(setup, generator):
  root, _, _, _, records, _ = setup
  sps = [sampling_lib.SamplingParams(max_new_tokens=NEW),
         sampling_lib.SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=3),
         sampling_lib.SamplingParams(max_new_tokens=2)]
  seen: dict[int, list[str]] = {}
  streamed = generator.generate(records, sps, image_root=root,
                                on_text=lambda i, text: seen.setdefault(i, []).append(text))
  assert streamed == generator.generate(records, sps, image_root=root)
  assert set(seen) <= {0, 1, 2} and seen  # every 2 tokens (stop_check_every), unfinished rows
  for i, texts in seen.items():
    stream = sampling_lib.TextStream()
    joined = "".join(stream.update(t) for t in texts) + stream.finish(streamed[i].text)
    assert joined == streamed[i].text


def _phi(cfg, switch=96):
  """cfg with Phi-3-style LongRoPE switching to its long factors past `switch` positions."""
  from fusion_jax.models.rope import LongRopeScaling
  hd = cfg.llm.head_dim // 2
  return cfg.replace(llm=cfg.llm.replace(rope_scaling=LongRopeScaling(
      (1.0,) * hd, (4.0,) * hd, original_max_position_embeddings=switch)))


def test_longrope_crossing_reprefills_with_the_long_factors(setup):
  """An answer that crosses the switch: tokens before it follow the short-regime forward of the
  sequence so far, tokens after it the long-regime forward (as transformers' recompute)."""
  root, tok, cfg, params, records, _ = setup
  phi, new = _phi(cfg), 40
  gen = generator_lib.Generator(params, phi, tok, q=Q, max_questions=LQ, max_seq_len=SEQ,
                          max_new_tokens=new, stop=())  # no stop token: the full length
  rec = records[2]
  _, n = gen.check(rec, sampling_lib.SamplingParams(max_new_tokens=new))
  cross = gen.crossing(n, new)
  assert cross == 96 - n and 0 < cross < new - 2, n
  ids = list(gen.generate([rec], sampling_lib.SamplingParams(max_new_tokens=new))[0].token_ids)
  assert len(ids) == new
  forward = jax.jit(lambda p, b: fusion.apply(p, b, phi, train=False)[0])

  def argmax_ok(k, steps):
    """Tokens `steps` are greedy under one full forward over the prompt + ids[:k]."""
    batch = prompt_batch([rec], tok, phi, image_root=root, q=Q, seq_len=160,
                                 max_questions=LQ)
    batch["input_ids"][0, n:n + k] = ids[:k]
    batch["token_mask"][0, n:n + k] = True
    batch["positions"][0, n:n + k] = np.arange(n, n + k)
    batch["segment_ids"][0, n:n + k] = 1
    logits = np.asarray(forward(params, batch))[0]
    for t in steps:
      row = logits[n - 1 + t]
      np.testing.assert_allclose(row[ids[t]], row.max(), atol=1e-4, err_msg=f"step {t}")

  argmax_ok(cross, range(cross + 1))  # max position n + cross - 1 = 95: short factors
  argmax_ok(new - 1, range(cross + 1, new))  # positions past 95: long factors


def test_long_prompts_are_batched_apart(setup, monkeypatch):
  """LongRoPE picks one regime per forward: rows whose prompt is past the switch never share a
  batch with rows before it."""
  _, tok, cfg, params, records, _ = setup
  phi = _phi(cfg)
  gen = generator_lib.Generator(params, phi, tok, q=Q, max_questions=LQ, max_seq_len=SEQ)
  long = {"id": "long", "conversations": [{"from": "human", "value": "Describe a cat. " * 4}]}
  prompts = [records[2], long, records[2], long]
  lengths = [gen.check(r, sampling_lib.SamplingParams(max_new_tokens=1))[1] for r in prompts]
  assert lengths[0] + 1 <= 96 < lengths[1], lengths
  batches = []

  def fake_run(rows, image_root, on_text=None):
    batches.append([r.index for r in rows])
    return [generator_lib.Completion(str(r.index), (), r.length, 0, "length") for r in rows]

  monkeypatch.setattr(gen, "_run", fake_run)
  out = gen.generate(prompts, sampling_lib.SamplingParams(max_new_tokens=1))
  assert batches == [[0, 2], [1, 3]] and [c.text for c in out] == ["0", "1", "2", "3"]


def test_sampling_params_are_validated():
  for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
              dict(top_k=-1), dict(stop=("",))):
    with pytest.raises(ValueError):
      sampling_lib.SamplingParams(**bad)
