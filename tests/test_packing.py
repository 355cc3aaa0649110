"""Sequence packing: the planner, the packed batch contract, the grain stage (every sample
once, exact resume) and the length-only simulation."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from fusion_jax.data import conversation, layout, packing, packing_plan
from fusion_jax.data import pipeline as pl
from fusion_jax.data.layout import choose_q
from fusion_jax.models import batch_spec
from pipeline_fixtures import (TINY_CFG, assert_batches_equal, tmp, tok,  # noqa: F401 (fixtures)
                               write_dataset)

PACK_CFG = dict(TINY_CFG, seq_len=200, batch_size=2, packing=True, max_samples_per_row=3)


@pytest.fixture(scope="module")
def ds(tmp):
  root = os.path.join(tmp, "data")
  return root, write_dataset(root, 13)


def _cfg(ds, **kw) -> dict:
  root, path = ds
  return dict(PACK_CFG, paths=(path,), image_root=root, **kw)


def segment_sample_ids(batch: dict, tokenizer) -> list[list[int]]:
  """Per row, the 'answer i' index of each packed sample, in slot order."""
  out = []
  for ids, labels, seg in zip(batch["input_ids"], batch["labels"], batch["segment_ids"]):
    row = []
    for s in range(1, int(seg.max()) + 1):
      sup = ids[(seg == s) & (labels != -100)]
      m = re.search(r"answer\s*(\d+)", tokenizer.decode(sup.tolist()).replace(" ", ""))
      assert m, tokenizer.decode(sup.tolist())
      row.append(int(m.group(1)))
    out.append(row)
  return out


def test_plan_rows_first_fit_decreasing_oldest_first():
  lengths = [30, 90, 50, 20, 60, 100]
  rows = packing.plan_rows(lengths, num_rows=2, seq_len=100, samples_per_row=3)
  placed = [i for r in rows for i in r]
  assert rows[0][0] == 0  # the oldest goes first, whatever its length
  assert len(placed) == len(set(placed))
  for r in rows:
    assert len(r) <= 3 and sum(lengths[i] for i in r) <= 100
  # After 0: 100 (-> row 1), 90 (fits nowhere: 30 + 90 > 100), 60 (row 0), 50 / 20 no room...
  assert rows == [[0, 4], [5]]
  assert packing.plan_rows([10] * 7, num_rows=2, seq_len=100, samples_per_row=3) == [
      [0, 1, 2], [3, 4, 5]]
  with pytest.raises(ValueError, match="exceeds seq_len"):
    packing.plan_rows([101], num_rows=1, seq_len=100, samples_per_row=2)


def test_sample_length_matches_layout(tok):
  rec = {"id": "x", "image": "a.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat color is the ball?"},
      {"from": "gpt", "value": "The ball is red."},
      {"from": "human", "value": "How many cats?"}, {"from": "gpt", "value": "There are 3."},
      {"from": "human", "value": "Where is the dog?"}, {"from": "gpt", "value": "Left."}]}
  enc = conversation.encode_conversation(rec, tok, "phi_3")
  for q, seq_len, lq in ((1, 500, 3), (4, 500, 3), (16, 500, 2), (4, 90, 3)):
    ex = layout.layout_sample(enc, q=q, num_image_tokens=9, seq_len=seq_len, max_questions=lq,
                              max_instruct_len=16, pad_id=tok.pad_id)
    n = layout.sample_length(enc, q=q, num_image_tokens=9, seq_len=seq_len, max_questions=lq)
    assert n == batch_spec.example_length(ex)


def test_pack_examples_keeps_each_sample(tok):
  recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"question {i}?"},
                                           {"from": "gpt", "value": f"answer {i}"}]}
          for i in range(3)]
  kw = dict(q=4, num_image_tokens=4, seq_len=160, max_questions=2, max_instruct_len=16,
            pad_id=tok.pad_id)
  exs = [layout.layout_sample(conversation.encode_conversation(r, tok, "phi_3"), **kw)
         for r in recs]
  for e in exs:
    e["images"] = np.full((5, 8, 8, 3), 7, np.uint8)
  b = batch_spec.pack_examples([[exs[0], exs[1]], [exs[2]]], seq_len=160, samples_per_row=2,
                               pad_id=tok.pad_id, num_rows=3)
  dims = batch_spec.check_batch(b)
  assert (dims.batch_size, dims.samples_per_row, dims.q) == (3, 2, 4)
  assert segment_sample_ids(b, tok) == [[0, 1], [2], []]
  n0 = batch_spec.example_length(exs[0])
  seg1 = b["segment_ids"][0] == 2
  assert seg1.sum() == batch_spec.example_length(exs[1])
  assert b["positions"][0][seg1].tolist() == list(range(int(seg1.sum())))  # restart per sample
  qp = exs[1]["question_pos"]
  assert b["question_pos"][0, 1].tolist() == np.where(qp >= 0, qp + n0, -1).tolist()
  assert batch_spec.sample_mask(b["segment_ids"], 2).tolist() == [[True, True], [True, False],
                                                                    [False, False]]
  assert not b["images"][1, 1].any() and (b["images"][0, 1] == 7).all()
  with pytest.raises(ValueError, match="more than seq_len"):
    batch_spec.pack_examples([exs], seq_len=n0 + 1, samples_per_row=3, pad_id=0)
  bad = dict(b, latent_pos=b["latent_pos"].copy())
  bad["latent_pos"][0, 0, 0] = int(n0)  # points into sample 1's segment
  with pytest.raises(ValueError, match="outside the sample's own segment"):
    batch_spec.check_batch(bad)


def test_pipeline_packs_every_sample_once_with_q_per_batch(ds, tok):
  it = pl.make_pipeline(_cfg(ds, num_epochs=1), tok, process_index=0, process_count=1)
  seen, per_row, eff = [], [], []
  for k, b in enumerate(it):
    batch_spec.check_batch(b)
    assert b["latent_pos"].shape[2] // b["question_pos"].shape[2] == choose_q(
        PACK_CFG["seed"], k, PACK_CFG["query_len"])
    ids = segment_sample_ids(b, tok)
    seen += [i for r in ids for i in r]
    per_row += [len(r) for r in ids if r]
    eff.append(b["token_mask"].mean())
    for r, row in enumerate(ids):  # images travel with their sample
      for p, i in enumerate(row):
        assert bool(b["has_image"][r, p]) == (i % 2 == 0) == bool(b["images"][r, p].any())
  assert sorted(seen) == list(range(13))
  assert it.counters["samples"] == 13
  assert max(per_row) >= 2 and np.mean(eff[:-1]) > 0.5


@pytest.mark.parametrize("workers", [0, 2])  # grain worker processes feed the packer too
def test_resume_rebuilds_the_buffer_exactly(ds, tok, workers):
  cfg = _cfg(ds, prefetch=2, packing_buffer=5, worker_count=workers)  # forever: crosses epochs
  it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what orbax stores
  counters = dict(it.counters)
  want = [next(it) for _ in range(5)]
  it.close()
  it2 = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  it2.set_state(state)
  assert it2.counters == counters
  for w in want:
    assert_batches_equal(w, next(it2))
  it2.close()


def test_simulate_length_mix():
  rng = np.random.default_rng(0)
  lengths = rng.integers(50, 400, 2000)
  r = packing.simulate(lengths, batch_size=8, seq_len=1024, samples_per_row=8, buffer=128)
  assert r["samples"] == 2000
  assert r["efficiency"] > 0.9 > 0.3 > r["unpacked_efficiency"]
  assert r["samples_per_row"] == pytest.approx(2000 / (8 * r["batches"]))


# ----------------------------------------------------------------------------- the model side


@pytest.fixture(scope="module")
def tiny_task():
  import ml_collections
  from fusion_jax.train.config import base_config
  from fusion_jax.task.fusion import FusionTask
  c = base_config()
  c.task = "fusion"
  c.model = ml_collections.ConfigDict(dict(preset="tiny", overrides=ml_collections.ConfigDict()))
  c.compute_dtype = "float32"
  c.global_batch = 2
  return FusionTask(c)


@pytest.mark.parametrize("scan", [False, True])
def test_packed_loss_equals_unpacked(tiny_task, scan):
  """The same 5 samples, one per row and packed 2 + 3 into two rows: the same loss within 1e-5
  in fp32. Unrolled decoder: the trainer's route (task sums / denominators); scanned decoder
  (interaction layers inside the scanned stack): fusion.loss_fn."""
  import dataclasses

  import flax.linen as nn
  import jax

  from fusion_jax.models import fusion
  task = tiny_task
  cfg = task.cfg
  if scan:
    cfg = dataclasses.replace(cfg, llm=cfg.llm.replace(scan_layers=True))
  exs = fusion.example_samples(cfg, 5, seq_len=32, max_questions=2, q=4, seed=1)
  unpacked = batch_spec.stack_examples(exs)
  packed = batch_spec.pack_examples([exs[:2], exs[2:]], seq_len=96, samples_per_row=3, pad_id=0)
  batch_spec.check_batch(packed)
  init_batch = fusion.example_batch(cfg, batch_size=1, seq_len=8, max_questions=1, q=1, seed=None)
  params = nn.meta.unbox(fusion.init(jax.random.key(0), cfg, init_batch)["params"])

  @jax.jit
  def trainer_loss(p, b):
    sums, _ = task.loss_fn(p, b, None)
    dens = task.loss_denominators(b)
    return sum(w * sums[k] / dens[k] for k, w in task.loss_weights.items()), dens

  @jax.jit
  def model_loss(p, b):
    loss, parts = fusion.loss_fn(p, b, cfg)
    return loss, {k: parts[k] for k in ("ce", "text_map", "vision_map")}

  f = model_loss if scan else trainer_loss
  loss_u, parts_u = jax.device_get(f(params, unpacked))
  loss_p, parts_p = jax.device_get(f(params, packed))
  assert abs(float(loss_p) - float(loss_u)) < 1e-5, (loss_p, loss_u)
  for k in parts_u:  # denominators (trainer) / mean parts (model)
    np.testing.assert_allclose(parts_p[k], parts_u[k], atol=1e-5, rtol=0, err_msg=k)


# ----------------------------------------------------------------------------- choosing P


def test_packing_plan_prices_empty_slots():
  """Samples of half a row: P = 2 fills every row; P = 3, 4 pack no more but compute more
  empty slots (tower, interaction), so P = 2 is the cheapest per sample."""
  from fusion_jax.data.data_config import DataConfig
  from fusion_jax.models import presets
  cfg = DataConfig(paths=("unused.json",), seq_len=200, batch_size=4, max_questions=2,
                   num_image_tokens=16, query_len=(4,))
  rows = packing_plan.plan(presets.TINY, cfg, {4: np.full(400, 100)}, (1, 2, 3, 4))
  by_p = {r["p"]: r for r in rows}
  assert by_p[1]["efficiency"] == pytest.approx(0.5)
  assert by_p[2]["efficiency"] == pytest.approx(1.0) == by_p[4]["efficiency"]
  assert by_p[4]["samples_per_row"] == pytest.approx(2.0)
  assert by_p[4]["tower_empty_share"] == pytest.approx(0.5)
  cost = [by_p[p]["model_flops_per_sample"] for p in (1, 2, 3, 4)]
  assert cost[1] < cost[0] and cost[1] < cost[2] < cost[3]
  table = packing_plan.format_table(rows)
  assert re.search(r"^\s+2 .*<- cheapest$", table, re.M), table


def test_packing_plan_reads_records_as_the_pipeline(ds, tok):
  """The plan's sample lengths are the rows the pipeline lays out (one q), and records the
  pipeline skips are counted, not measured."""
  root, _ = ds
  bad = {"id": "bad", "conversations": [{"from": "human", "value": "no answer"}]}
  path = write_dataset(os.path.join(root, "plan"), 6, extra=[bad])
  cfg = pl.DataConfig(**dict(TINY_CFG, paths=(path,), image_root=os.path.dirname(path),
                             query_len=(4,), num_epochs=1, batch_size=1))
  encs, skipped = packing_plan.encoded_samples(cfg, tok, records=100)
  assert (len(encs), skipped) == (6, 1)
  with pl.make_pipeline(cfg, tok, process_index=0, process_count=1) as it:
    want = sorted(int(b["token_mask"].sum()) for b in it)
  assert sorted(packing_plan.sample_lengths(cfg, encs, 4).tolist()) == want


def test_packing_plan_command(ds, tok, tmp):
  """python -m fusion_jax.data.packing_plan on an experiment config: the table and the pick."""
  import subprocess
  import sys
  root, path = ds
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "fusion_jax.data.packing_plan",
       "--config", os.path.join(repo, "experiments", "fusion_tiny.py"),
       f"--config.data.paths={path}", f"--config.data.image_root={root}",
       f"--config.data.tokenizer={os.path.join(tmp, 'tok')}", "--p", "1,2,3"],
      capture_output=True, text=True, cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "13 records (0 the pipeline would skip), seq_len 128" in out.stdout
  assert len(re.findall(r"^\s+[123] +\d+\.\d%", out.stdout, re.M)) == 3, out.stdout
  assert re.search(r"cheapest: --config.data.packing=\w+ --config.data.max_samples_per_row=[123]",
                   out.stdout)


def test_packing_plan_prepares_the_main_jobs_stages(tmp_path, capsys):
  """experiments/smoke.py has no data paths: the plan prepares a stage as fusion_jax.run does
  (the synthesized dataset, the base LLM's tokenizer, the stage's subset and seq_len)."""
  from experiments import smoke
  config = smoke.get_config("short")
  config.synth.cache_dir = str(tmp_path / "cache")
  workdir = str(tmp_path / "plan")
  c = packing_plan.main_job_stage(config, "alignment", workdir)
  assert c.data.seq_len == 128 and os.path.basename(c.data.paths[0]).startswith("train_alignment")
  assert c.data.tokenizer == os.path.join(workdir, "base_model", "tokenizer")
  assert packing_plan.main_job_stage(config, "", workdir).data.seq_len == config.data.seq_len
  packing_plan.print_plan(c, records=60, ps=[1, 2])
  out = capsys.readouterr().out
  assert re.search(r"\d+ records \(0 the pipeline would skip\), seq_len 128", out), out
  assert re.search(r"cheapest: --config.data.packing=\w+ --config.data.max_samples_per_row=[12]",
                   out)
  with pytest.raises(SystemExit, match=r"--stage 'nope' is not one of the config's stages "
                     r"\['alignment', 'instruction'\]"):
    packing_plan.main_job_stage(config, "nope", workdir)
