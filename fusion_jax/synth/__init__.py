"""Synthesized Language-Driven QA data (docs/model.md §15): text first, image from text,
questions from text, then filtering.

Modules (one stage or concept each):
  scene.py       Description / Panel / Obj / Sign dataclasses, the named palette, words
  categories.py  the 12 synthesis categories
  describe.py    procedural describe stage (category -> planned scene + caption)
  render.py      procedural render stage (PIL, anti-aliased, textured) + PNG writer
  ask.py         procedural ask stage (templates -> Turns with closed-answer metadata)
  measure.py     pixel measurements (palette classes, connected components, shapes)
  filter.py      per-item rejection reasons, dedup, answer balancing
  records.py     Turn, LLaVA record building, ArrayRecord entry writing
  backends.py    stage protocols, import-path loading, LLM / text-to-image adapters
  pipeline.py    the parallel deterministic engine (`synthesize(SynthConfig(...))`) and the
                 dataset finishing both engines share (select, quotas, splits, stats files)
  stats.py       chance level, majority-answer rate, rejection counts
Model backends and the resumable engine (docs/synth.md, "Synthesis with real models"):
  openai_client.py  OpenAI-compatible chat client: retries, backoff, request budget
  llm_backend.py    LLM describe + ask, strict JSON reply parsing; prompts/ holds the templates
  t2i_diffusers.py  diffusers text-to-image renderer (optional: requirements-synth.txt)
  vlm_filter.py     vision-language model votes on every answer (k of n)
  rejection.py      ItemRejected: a stage drops an item with a counted reason
  shards.py         append-only shard files of finished items
  sharded.py        threaded, resumable engine with item / request limits and progress

CLI: `python -m fusion_jax.synth --out DIR --num N --seed S [--llm-url ... --t2i-pipeline ...
--filter-url ...]`; see docs/synth.md.
"""
