"""A small synth run (empty held-out split) still prepares as TFDS; failures leave nothing."""
from __future__ import annotations

import json
import os

import pytest

from fusion_jax.data import synth_tfds
from fusion_jax.synth.pipeline import SynthConfig, synthesize
from pipeline_fixtures import good_record


def test_empty_heldout_split_is_announced_and_left_out_of_tfds(tmp_path, capsys):
  out = str(tmp_path / "synth")
  synthesize(SynthConfig(out=out, num=6, seed=0, size=32, progress=False,
                         categories=("SynthColor", "SynthCount")))
  err = capsys.readouterr().err
  assert "held-out split is empty" in err and "--num >= 12" in err
  with open(os.path.join(out, "heldout.json")) as f:
    assert json.load(f) == []
  builder = synth_tfds.prepare(out, str(tmp_path / "tfds"))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6}


def _dir_with(tmp_path, files: dict) -> str:
  d = tmp_path / "synth"
  d.mkdir()
  for name, recs in files.items():
    (d / name).write_text(json.dumps(recs))
  return str(d)


def test_split_of_only_skipped_records_fails_cleanly(tmp_path):
  gone = dict(good_record(1, image=True), image="missing.png")
  synth_dir = _dir_with(tmp_path, {"train.json": [good_record(0, image=False)],
                                   "heldout.json": [gone]})
  data_dir = tmp_path / "tfds"
  with pytest.raises(ValueError, match="every record of that split was skipped"):
    synth_tfds.prepare(synth_dir, str(data_dir))
  assert not data_dir.exists()  # no partial dataset directories
  (data_dir / "keep").mkdir(parents=True)  # a data_dir that existed keeps what it had
  with pytest.raises(ValueError):
    synth_tfds.prepare(synth_dir, str(data_dir))
  assert sorted(p.name for p in data_dir.iterdir()) == ["keep"]


def test_no_records_at_all_is_one_line_exit_2(tmp_path, capsys):
  synth_dir = _dir_with(tmp_path, {"train.json": [], "heldout.json": []})
  assert synth_tfds.main(["--synth_dir", synth_dir, "--data_dir", str(tmp_path / "t")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "every LLaVA file is empty" in err
  assert "\n" not in err and not (tmp_path / "t").exists()
