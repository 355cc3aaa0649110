"""The fusion_synth TFDS builder prepares and reads (tfds.data_source -> grain) without TF."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import grain
import pytest
import tensorflow_datasets as tfds

from fusion_jax.data import pipeline as pl
from fusion_jax.data import sources as S
from fusion_jax.data import synth_tfds
from pipeline_fixtures import TINY_CFG, batch_sample_ids, good_record, make_tokenizer, png_bytes


def _synth_dir(root: str) -> str:
  """A fusion_jax.synth-like output: category JSON files, images under images/."""
  d = os.path.join(root, "synth")
  os.makedirs(os.path.join(d, "images", "color"), exist_ok=True)
  train = []
  for i in range(6):
    rec = good_record(i, image=i % 3 != 2)
    if rec.get("image"):
      rec["image"] = f"color/{i}.png"  # relative to synth_dir/images
      with open(os.path.join(d, "images", rec["image"]), "wb") as f:
        f.write(png_bytes(i))
    train.append(rec)
  train.append({"id": "gone", "image": "color/missing.png", "conversations": [
      {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "answer 98"}]})
  with open(os.path.join(d, "SynthColor.json"), "w") as f:
    json.dump(train, f)
  with open(os.path.join(d, "SynthCount_val.jsonl"), "w") as f:
    for i in (40, 41):
      f.write(json.dumps(good_record(i, image=False)) + "\n")
  return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  data_dir = os.path.join(root, "tfds_data")
  builder = synth_tfds.prepare(_synth_dir(root), data_dir)
  return root, data_dir, builder


def test_tensorflow_is_not_installed():
  assert importlib.util.find_spec("tensorflow") is None


def test_prepare_writes_array_record_splits(prepared):
  _, data_dir, builder = prepared
  assert builder.info.file_format.value == "array_record"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 6, "validation": 2}  # the record with a missing image is skipped
  files = os.listdir(builder.data_dir)
  assert any(".array_record-" in f for f in files)
  assert "tensorflow" not in sys.modules


def test_data_source_reads_into_grain_without_tf(prepared):
  root, data_dir, _ = prepared
  ds = tfds.data_source(synth_tfds.NAME, data_dir=data_dir, split="train")
  assert len(ds) == 6
  ids = sorted(grain.MapDataset.source(ds).map(lambda e: e["id"].decode()))
  assert ids == [f"s{i}" for i in range(6)]
  by_id = {synth_tfds.tfds_example_to_raw(ds[i], "w").record["id"]: ds[i] for i in range(6)}
  raw = synth_tfds.tfds_example_to_raw(by_id["s1"], "w")
  assert raw.image_bytes == png_bytes(1) and raw.record["image"] == "color/1.png"
  assert raw.source.endswith("SynthColor.json#1") and raw.record == good_record(1, True) | {
      "image": "color/1.png"}
  text_only = synth_tfds.tfds_example_to_raw(by_id["s2"], "w")
  assert text_only.image_bytes is None and "image" not in text_only.record
  assert "tensorflow" not in sys.modules


def test_pipeline_reads_tfds_source(prepared):
  root, data_dir, _ = prepared
  tok = make_tokenizer(root)
  cfg = dict(TINY_CFG, tfds_name=synth_tfds.NAME, tfds_data_dir=data_dir, tfds_split="train",
             batch_size=3)
  it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1, train=False)
  batches = list(it)
  assert sorted(i for b in batches for i in batch_sample_ids(b, tok)) == list(range(6))
  assert sum(int(b["has_image"].sum()) for b in batches) == 4
  assert it.skip_counters() == {}
  with pytest.raises(S.MixtureError, match="cannot be opened"):
    synth_tfds.TfdsSource(synth_tfds.NAME, data_dir=os.path.join(root, "empty"), split="train")
  assert "tensorflow" not in sys.modules


def test_prepares_real_synth_output(tmp_path):
  """fusion_jax.synth's own output: train.json -> train, heldout.json -> heldout, stats.json ignored."""
  from fusion_jax.synth.__main__ import main as synth_main
  out = str(tmp_path / "synth")
  synth_main(["--out", out, "--num", "40", "--seed", "1", "--size", "32", "--quiet",
              "--categories", "SynthColor,SynthCount"])
  with open(os.path.join(out, "train.json")) as f:
    n_train = len(json.load(f))
  with open(os.path.join(out, "heldout.json")) as f:
    n_heldout = len(json.load(f))
  builder = synth_tfds.prepare(out, str(tmp_path / "tfds"))
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert splits == {"train": n_train, "heldout": n_heldout}
  ds = tfds.data_source(synth_tfds.NAME, data_dir=str(tmp_path / "tfds"), split="heldout")
  assert {ex["category"].decode() if isinstance(ex["category"], bytes) else ex["category"]
          for ex in ds} <= {"SynthColor", "SynthCount"}
