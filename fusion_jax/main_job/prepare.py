"""The main job's inputs: the synthesized dataset and the tokenizer (each cached by the
parameters that define it), the imported base model, and the config they complete."""
from __future__ import annotations

import hashlib
import json
import os

import ml_collections

from fusion_jax.main_job import say


def synthesizer_digest() -> str:
  """sha1 of fusion_jax.synth's files (code and prompt templates): what draws the records."""
  import fusion_jax.synth  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.abspath(fusion_jax.synth.__file__))
  h = hashlib.sha1()
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(f for f in files if not f.endswith(".pyc")):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def dataset_dir(synth: ml_collections.ConfigDict) -> str:
  """Cache folder of a synthesized dataset, keyed by the parameters that define it and by the
  synthesizer's files: after a change to fusion_jax.synth the job synthesizes afresh instead of
  training on records the current code would not draw."""
  key = json.dumps({**{k: synth[k] for k in ("num", "seed", "size", "categories", "heldout")},
                    "synthesizer": synthesizer_digest()}, sort_keys=True, default=list)
  digest = hashlib.sha1(key.encode()).hexdigest()[:10]
  return os.path.join(synth.cache_dir, f"synth_{synth.size}px_{synth.num}_{digest}")


def synthesize(synth: ml_collections.ConfigDict) -> str:
  """fusion_jax.synth into the cache folder unless it is already there."""
  out = dataset_dir(synth)
  if os.path.isfile(os.path.join(out, "train.json")):
    say(f"dataset: reusing {out}")
    return out
  from fusion_jax.synth.__main__ import main as synth_main
  tmp = out + ".partial"
  args = ["--out", tmp, "--num", str(synth.num), "--seed", str(synth.seed), "--size",
          str(synth.size), "--heldout", str(synth.heldout), "--overwrite",
          "--categories", ",".join(synth.categories)]
  say("dataset: python -m fusion_jax.synth " + " ".join(args))
  rc = synth_main(args)
  if rc:
    raise RuntimeError(f"fusion_jax.synth failed with exit code {rc}")
  os.replace(tmp, out)
  return out


def tokenizer_dir(data_dir: str, vocab_size: int) -> str:
  """A sentencepiece tokenizer trained on the dataset's text (once)."""
  from fusion_jax.data.tokenizer import IMAGE_MARKER
  from fusion_jax.data.tokenizer_train import train_sentencepiece
  out = os.path.join(data_dir, f"tokenizer_{vocab_size}")
  if os.path.isfile(os.path.join(out, "tokenizer.model")):
    say(f"tokenizer: reusing {out}")
    return out
  with open(os.path.join(data_dir, "train.json")) as f:
    records = json.load(f)
  texts = [t["value"].replace(IMAGE_MARKER, "").strip() for r in records
           for t in r["conversations"]]
  texts += [r["caption"] for r in records if r.get("caption")]
  say(f"tokenizer: training sentencepiece ({vocab_size} pieces) on {len(texts)} texts")
  train_sentencepiece(texts, os.path.join(out, "tokenizer"), vocab_size)
  return out


def import_base(base: ml_collections.ConfigDict, template: str, workdir: str) -> str:
  """The stage-1 start model from the base LLM and SigLIP tower (transformers dirs), written
  by `python -m fusion_jax.convert.import_hf` into <workdir>/base_model (once), as a user
  starting from real base models runs it, with the job's chat template."""
  from fusion_jax.convert import import_hf
  out = os.path.join(workdir, "base_model")
  if os.path.isfile(os.path.join(out, "fusion_config.json")):
    say(f"base model: reusing {out}")
    return out
  args = ["--llm", base.llm, "--vision", base.vision, "--preset", base.preset,
          "--template", template, "--out", out]
  say("base model: python -m fusion_jax.convert.import_hf " + " ".join(args))
  if import_hf.main(args):
    raise RuntimeError(f"import_hf failed for {base.llm} + {base.vision}")
  say(f"base model: weights only are used; the other FUSION fields (interaction schedule, query "
      f"lengths) come from config.model, not from preset {base.preset!r}")
  return out


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None
            ) -> ml_collections.ConfigDict:
  """Fills config.data (paths, image_root, tokenizer) and the vocabulary from the tokenizer.

  With config.base (llm, vision, preset: transformers dirs, e.g. assets/tiny_bases) and a
  workdir, the base models are imported (`import_base`), training starts from them
  (config.init_from) and the tokenizer is the base LLM's; otherwise a tokenizer is trained on
  the dataset and the model starts from random init. The vocabulary size and pad id the model
  gets are task.fusion.tokenizer_vocab's (the one rule; the data side loads the same tokenizer).
  """
  from fusion_jax.task.fusion import fusion_config_from, load_task_tokenizer, tokenizer_vocab
  template = fusion_config_from(config.model).template  # the tokenizer's pad token
  data_dir = synthesize(config.synth)
  base = config.get("base")
  model_dir = ""
  if base and base.get("llm") and workdir:
    model_dir = import_base(base, template, os.path.abspath(workdir))
    tok_dir = os.path.join(model_dir, "tokenizer")
  else:
    tok_dir = tokenizer_dir(data_dir, int(config.tokenizer.vocab_size))
  tok = load_task_tokenizer(tok_dir, template)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.paths = (os.path.join(data_dir, "train.json"),)
  config.data.image_root = data_dir
  config.data.tokenizer = tok_dir
  embedding_rows = None
  if model_dir:
    # The imported embedding has exactly len(tokenizer) rows (import_hf adds the 2 vision rows).
    from fusion_jax.convert.model_dir import load_model_config
    embedding_rows = load_model_config(model_dir).llm.vocab_size
    config.init_from = config.init_from or model_dir
  config.model.overrides.llm = {**dict(config.model.overrides.get("llm", {})),
                                **tokenizer_vocab(tok, embedding_rows)}
  return config
