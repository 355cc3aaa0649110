r"""Choosing P (`data.max_samples_per_row`) for packing: the packer on your data's lengths,
priced in the model's FLOPs per sample.

    python -m fusion_jax.data.packing_plan --config experiments/fusion_3b.py:stage2 \
        [--records 4000] [--p 1,2,3,4,6,8] [--hosts 1]
    python -m fusion_jax.data.packing_plan --config experiments/smoke.py [--stage alignment]

A larger P packs rows tighter, but every sample slot costs the same whether a sample fills
it or not: the tower's 5 crops, the slot's instruction tokens and its P x Lq interaction
slots (fusion_jax/models/batch_spec.py). So FLOPs per sample fall while rows fill up and rise
again once most new slots stay empty; the cheapest P sits near the samples one row can hold.
On a LLaVA-like stage-2 mix at FUSION 3B (benchmarks/data_pipeline.py --packing_only) P = 4
costs 45.6 TFLOP per sample and P = 8, which packs only 2 points tighter, 60.1.

Reads up to --records records spread evenly over the config's data (paths, mixture or TFDS),
encodes them as the pipeline does (records it would skip are counted and left out), measures
them at each q candidate and runs the packer on the lengths (`packing.simulate`, the
pipeline's own plan_rows and buffer). Prints, per P, packing efficiency, samples per row, the
train step's model FLOPs per sample (fusion_jax.models.flops, as the trainer's MFU counts
them) against unpacked, the tower's share of the step and the share of its work spent on empty
slots, and marks the cheapest P. No images are decoded and nothing is compiled.

The main job's config (experiments/smoke.py: a `synth` section, no data paths) is prepared as
`fusion_jax.run` prepares it (the dataset synthesized into its cache unless there, the base
model's tokenizer) and planned for one of its stages (--stage, default the last).
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusion_jax.data import conversation, layout, packing, pipeline, sources
from fusion_jax.data.data_config import DataConfig
from fusion_jax.data.errors import BadSample
from fusion_jax.models import flops


def encoded_samples(cfg: DataConfig, tokenizer: Any, records: int) -> tuple[list[Any], int]:
  """Up to `records` samples spread evenly over the config's data, encoded and checked as the
  pipeline does (no images decoded). Returns (encoded samples, records the pipeline would
  skip)."""
  source = pipeline.build_source(cfg)
  n = len(source)
  if n == 0:
    raise ValueError("packing_plan: the config's data holds no records")
  idx = np.unique(np.linspace(0, n - 1, min(records, n)).astype(np.int64))
  q_check = layout.largest_batch_q(cfg, train=True)
  encs, skipped = [], 0
  for i in idx:
    raw = source[int(i)]
    try:
      enc = conversation.encode_conversation(sources.parse_record(raw), tokenizer, cfg.template,
                                             source=raw.source)
      layout.check_sample(enc, q_max=q_check, num_image_tokens=cfg.num_image_tokens,
                          seq_len=cfg.seq_len, max_questions=cfg.max_questions)
    except BadSample:
      skipped += 1
      continue
    encs.append(enc)
  return encs, skipped


def sample_lengths(cfg: DataConfig, encs: Sequence[Any], q: int) -> np.ndarray:
  """Row tokens of each sample at q latents per question (`layout.sample_length`: slots
  included, truncated to seq_len)."""
  return np.asarray([layout.sample_length(e, q=q, num_image_tokens=cfg.num_image_tokens,
                                          seq_len=cfg.seq_len, max_questions=cfg.max_questions)
                     for e in encs], np.int64)


def step_cost(fusion_cfg: Any, *, p: int, samples_per_row: float, seq_len: int, q: int,
              max_questions: int, loss_chunks: int = 1, instruct_len: int | None = None
              ) -> dict[str, float]:
  """Model FLOPs of a train step per sample at P slots per row holding `samples_per_row` on
  average (flops.train_step_flops: P tower passes and P x Lq interaction slots per row, filled
  or not; decoder attention within equal segments)."""
  f = flops.train_step_flops(fusion_cfg, batch=1, seq_len=seq_len, q=q,
                             max_questions=p * max_questions, instruct_len=instruct_len,
                             images_per_row=p, segments_per_row=max(1, round(samples_per_row)),
                             loss_chunks=loss_chunks)
  return {"model_flops_per_sample": f["model"] / samples_per_row,
          "tower_share": 3.0 * f["fwd"]["tower"] / f["model"],
          "tower_empty_share": 1.0 - samples_per_row / p}


def plan(fusion_cfg: Any, cfg: DataConfig, lengths_by_q: dict[int, np.ndarray],
         ps: Sequence[int], *, loss_chunks: int = 1,
         instruct_len: int | None = None) -> list[dict[str, float]]:
  """Per P: the packer's efficiency and samples per row on the lengths (averaged over the q
  candidates, which the pipeline draws per batch), and the step's cost per sample."""
  rows = []
  for p in ps:
    c = dataclasses.replace(cfg, packing=p > 1, max_samples_per_row=p)
    per_q = []
    for q, lengths in lengths_by_q.items():
      sim = packing.simulate(lengths, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                             samples_per_row=p, buffer=packing.buffer_size(c))
      per_q.append({**sim, **step_cost(fusion_cfg, p=p, samples_per_row=sim["samples_per_row"],
                                       seq_len=cfg.seq_len, q=q, max_questions=cfg.max_questions,
                                       loss_chunks=loss_chunks, instruct_len=instruct_len)})
    keys = ("efficiency", "samples_per_row", "model_flops_per_sample", "tower_share",
            "tower_empty_share")
    rows.append({"p": p, **{k: float(np.mean([r[k] for r in per_q])) for k in keys}})
  return rows


def cheapest(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  """The plan's row with the fewest model FLOPs per sample."""
  return min(rows, key=lambda r: r["model_flops_per_sample"])


def format_table(rows: Sequence[dict[str, float]]) -> str:
  """The plan as a text table, the cheapest P marked."""
  base = next((r["model_flops_per_sample"] for r in rows if r["p"] == 1), None)
  best = cheapest(rows)["p"]
  unit, scale = ("TFLOP", 1e12) if max(r["model_flops_per_sample"] for r in rows) >= 1e12 else (
      "GFLOP", 1e9)
  lines = [f"{'P':>3s} {'efficiency':>10s} {'samples/row':>11s} {unit + '/sample':>12s} "
           f"{'vs P=1':>6s} {'tower share':>11s} {'tower on empty slots':>20s}"]
  for r in rows:
    speed = f"{base / r['model_flops_per_sample']:5.2f}x" if base else "     -"
    lines.append(f"{r['p']:3d} {100 * r['efficiency']:9.1f}% {r['samples_per_row']:11.2f} "
                 f"{r['model_flops_per_sample'] / scale:12.4g} {speed} "
                 f"{100 * r['tower_share']:10.1f}% {100 * r['tower_empty_share']:19.1f}%"
                 + ("  <- cheapest" if r["p"] == best else ""))
  return "\n".join(lines)


def main_job_stage(config: Any, stage: str, workdir: str) -> Any:
  """The config one stage of the main job trains with (its data and tokenizer as
  fusion_jax.run prepares them; the base model imported into `workdir`)."""
  # The tool's entry point only: the data package itself never depends on the main job.
  from fusion_jax.main_job.prepare import prepare  # pylint: disable=g-import-not-at-top
  from fusion_jax.main_job.stages import stage_plan  # pylint: disable=g-import-not-at-top
  stages = {name: c for name, c, _ in stage_plan(prepare(config, workdir), workdir)}
  if stage and stage not in stages:
    raise SystemExit(f"packing_plan: --stage {stage!r} is not one of the config's stages "
                     f"{list(stages)}")
  return stages[stage or list(stages)[-1]]


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  config = fv.config
  with tempfile.TemporaryDirectory() as workdir:
    if config.get("synth") is not None:  # the main job's: data and tokenizer prepared here
      config = main_job_stage(config, fv.stage, workdir)
    print_plan(config, records=fv.records, ps=sorted(set(int(p) for p in fv.p)), hosts=fv.hosts)


def print_plan(config: Any, *, records: int, ps: Sequence[int], hosts: int = 1) -> None:
  """Prints the plan of an experiment config: the table, the cheapest P and its batch."""
  from fusion_jax.task.fusion import FusionTask  # pylint: disable=g-import-not-at-top
  task = FusionTask(config)
  cfg = task.data_config(hosts)
  qs = sorted(set(int(q) for q in cfg.query_len))
  encs, skipped = encoded_samples(cfg, task.tokenizer, records)
  n = len(encs)
  if n == 0:
    raise SystemExit(f"packing_plan: all {skipped} records read would be skipped by the "
                     "pipeline; check config.data and the records (a training run logs why)")
  lengths_by_q = {q: sample_lengths(cfg, encs, q) for q in qs}
  rows = plan(task.cfg, cfg, lengths_by_q, ps, loss_chunks=task.loss_chunks)
  lens = lengths_by_q[qs[len(qs) // 2]]
  print(f"{n} records ({skipped} the pipeline would skip), seq_len {cfg.seq_len}, "
        f"{cfg.batch_size} rows per host batch, q {'/'.join(map(str, qs))}; tokens per sample "
        f"at q={qs[len(qs) // 2]}: mean {lens.mean():.0f}, p50/p90/max "
        f"{'/'.join(f'{x:.0f}' for x in np.percentile(lens, [50, 90, 100]))}")
  print(format_table(rows))
  best = cheapest(rows)
  p = best["p"]
  print(f"cheapest: --config.data.packing={p > 1} --config.data.max_samples_per_row={p} "
        "(train-step model FLOPs per sample; every slot runs the tower, filled or not)")
  if p > 1:
    gb = int(config.global_batch)
    same = max(1, round(gb / best["samples_per_row"]))
    print(f"packed, the config's {gb} rows per step carry ~{gb * best['samples_per_row']:.0f} "
          f"samples and {p} tower passes each; for its {gb} samples per optimizer step set "
          f"--config.global_batch={same} (rounded to a multiple of the devices the batch is "
          "sharded over) and check the fit: python -m fusion_jax.aot --config ... --topology ...")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "experiment config (experiments/NAME.py[:ARG])")
  flags.mark_flag_as_required("config")
  flags.DEFINE_integer("records", 4000, "records read, spread evenly over the data")
  flags.DEFINE_list("p", ["1", "2", "3", "4", "6", "8"], "P values to compare")
  flags.DEFINE_integer("hosts", 1, "processes the global batch is split over (rows per host "
                       "batch = global_batch / hosts; the packer packs each host's batch)")
  flags.DEFINE_string("stage", "", "the main job's configs (a `synth` section): which of "
                      "config.stages to plan (default: the last)")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
