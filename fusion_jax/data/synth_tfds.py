"""A tensorflow-datasets builder for the synthesized FUSION data, usable WITHOUT TensorFlow.

    python -m fusion_jax.data.synth_tfds --synth_dir SYNTH --data_dir TFDS_DATA
    # then, in the training config: tfds_name: fusion_synth, tfds_data_dir: TFDS_DATA

or from Python::

    builder = prepare(synth_dir, data_dir)          # FusionSynth, array_record files
    ds = tfds.data_source("fusion_synth", data_dir=data_dir, split="train")
    grain.MapDataset.source(ds)                     # NumPy examples, no TF anywhere

Input (`synth_dir`, what `fusion_jax.synth` writes): LLaVA `.json` / `.jsonl` files at its
top level or in `jsons/`, image paths relative to `synth_dir` (or to `synth_dir/images`). Each
file's stem is the example's `category` (SynthColor, SynthCount, ...). Files whose stem ends in
`heldout` (what `fusion_jax.synth` writes) goes to split "heldout", `_val`/`_validation` to
"validation", `_test` to "test", all others to "train"; `stats.json` is the synth report, not data.

Features (chosen so that writing AND reading need no TensorFlow: TFDS serialises examples with
its own vendored tf.train.Example protos, and these features encode/decode with NumPy only.
`tfds.features.Image` is avoided: encoding an image given as an array calls TF, and decoding
would return pixels while we want the original file bytes for our own static_hd resize):

    id            Text         record id
    category      Text         the record's "category" (SynthColor, ...), else the file stem
    source        Text         "file:line" / "file#index" of the original record
    image_path    Text         the record's relative image path ('' for text-only)
    image         Tensor((), object)   the image file's bytes, unchanged (b'' for text-only)
    conversations Sequence({from: Text, value: Text})

Records that cannot be read while preparing (bad JSON line, missing image file) are skipped,
counted and logged with their source; the counts are printed at the end of `prepare`.
A file without records (e.g. the empty heldout.json of a small `--num`) is left out, and so is
a split that gets no file (logged); a split whose every record is skipped, or a directory with
no record at all, is a clear error. A failed `prepare` removes what it created under
`data_dir` (no partial dataset directories).
`TfdsSource` adapts the examples back to LLaVA records for the pipeline.
"""
from __future__ import annotations

import collections
import glob
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from fusion_jax import cli
from fusion_jax.data import mixture as mixture_lib
from fusion_jax.data import sources as sources_lib
from fusion_jax.data.errors import BadSample

NAME = "fusion_synth"
_SPLIT_SUFFIXES = {"heldout": "heldout", "_val": "validation", "_validation": "validation",
                   "_test": "test"}
_NOT_DATA = ("manifest", "dataset_info", "stats")


def _split_of(stem: str) -> str:
  for suffix, split in _SPLIT_SUFFIXES.items():
    if stem.endswith(suffix):
      return split
  return "train"


def find_json_files(synth_dir: str) -> list[str]:
  """LLaVA JSON / JSONL files of a synthesized-data directory (top level and jsons/)."""
  files = []
  for sub in ("", "jsons"):
    for ext in ("*.json", "*.jsonl"):
      files += glob.glob(os.path.join(synth_dir, sub, ext))
  files = sorted(set(os.path.abspath(f) for f in files
                     if not os.path.basename(f).startswith(_NOT_DATA)))
  if not files:
    raise FileNotFoundError(f"{synth_dir}: no LLaVA .json/.jsonl files (looked at the top level "
                            "and in jsons/); point --synth_dir at fusion_jax.synth's output")
  return files


def _stem(path: str) -> str:
  return os.path.basename(path).rsplit(".", 1)[0]


class FusionSynth(tfds.core.GeneratorBasedBuilder):
  """FUSION's synthesized language-driven QA data (docs/model.md §15) from LLaVA JSON + image files.

  Prepare with `download_config=tfds.download.DownloadConfig(manual_dir=SYNTH_DIR)` (or
  `prepare(...)`). Default file format: array_record (random access for grain).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "LLaVA records with embedded image bytes; readable without TF."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Generate the data with fusion_jax.synth, then pass its output directory as manual_dir "
      "(python -m fusion_jax.data.synth_tfds --synth_dir DIR --data_dir OUT).")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 resolves this through `importlib_resources`, which it only depends on for
    # Python < 3.9 (so it is absent here) and imports lazily -> ModuleNotFoundError. The answer
    # is simply this file (tfds looks for an optional checksums.tsv next to it).
    return epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="FUSION synthesized language-driven QA data (LLaVA conversations + images).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "category": tfds.features.Text(),
            "source": tfds.features.Text(),
            "image_path": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "conversations": tfds.features.Sequence({
                "from": tfds.features.Text(),
                "value": tfds.features.Text(),
            }),
        }),
        homepage="https://arxiv.org/abs/2504.09925",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    synth_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(files, synth_dir)
            for split, files in sorted(files_by_split(synth_dir).items())}

  def _generate_examples(self, files: Sequence[str], synth_dir: str):
    skipped: collections.Counter[str] = collections.Counter()
    roots = (synth_dir, os.path.join(synth_dir, "images"))
    for path in files:
      src = mixture_lib.open_entry(mixture_lib.MixtureEntry(path, mixture_lib.json_kind(path)))
      category = _stem(path)
      for i in range(len(src)):
        raw = src[i]
        try:
          rec = sources_lib.parse_record(raw)
          yield f"{category}:{i}", _example(rec, raw.source, category, roots)
        except BadSample as e:
          skipped[e.reason] += 1
          logging.warning("fusion_synth: skipped %s: %s", e.source or raw.source, e)
    if skipped:
      logging.warning("fusion_synth: skipped while preparing: %s", dict(skipped))


def files_by_split(synth_dir: str, log: bool = True) -> dict[str, list[str]]:
  """{split: data files holding at least one record}; empty files and splits are left out
  (TFDS cannot write a split without examples) and logged when `log`."""
  by_split: dict[str, list[str]] = collections.defaultdict(list)
  empty = []
  for f in find_json_files(synth_dir):
    src = mixture_lib.open_entry(mixture_lib.MixtureEntry(f, mixture_lib.json_kind(f)))
    if len(src):
      by_split[_split_of(_stem(f))].append(f)
    else:
      empty.append(f)
  for f in empty if log else ():
    split = _split_of(_stem(f))
    logging.warning("fusion_synth: %s holds no records; %s", f,
                    f"split {split!r} gets the other files only" if split in by_split else
                    f"split {split!r} is left out")
  if not by_split:
    names = [os.path.basename(f) for f in empty]
    raise ValueError(f"{synth_dir}: every LLaVA file is empty ({names}); synthesize some "
                     "records first (python -m fusion_jax.synth --num N)")
  return dict(by_split)


def _example(rec: dict, source: str, category: str, roots: Sequence[str]) -> dict:
  conv = rec.get("conversations")
  if not isinstance(conv, list):
    raise BadSample("bad_record", "'conversations' missing or not a list", source)
  turns = []
  for t in conv:
    if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
      raise BadSample("bad_record", "a turn is not a {from, value: str} object", source)
    turns.append({"from": str(t["from"]), "value": t["value"]})
  image_path = rec.get("image") or ""
  image = b""
  if image_path:
    if not isinstance(image_path, str):
      raise BadSample("bad_record", "'image' is not a path string", source)
    for root in roots:
      p = os.path.join(root, image_path)
      if os.path.isfile(p):
        with open(p, "rb") as f:
          image = f.read()
        break
    else:
      raise BadSample("missing_image", f"{image_path} not found under {list(roots)}", source)
  category = rec.get("category") if isinstance(rec.get("category"), str) else category
  return {"id": str(rec.get("id", "")), "category": category, "source": source,
          "image_path": image_path, "image": image,
          "conversations": {"from": [t["from"] for t in turns],
                            "value": [t["value"] for t in turns]}}


def _tree(path: str, depth: int = 2) -> set[str]:
  """Paths under `path` down to `depth` levels (what a failed prepare may have created)."""
  out = set()
  if os.path.isdir(path):
    for entry in os.listdir(path):
      p = os.path.join(path, entry)
      out.add(p)
      if depth > 1 and os.path.isdir(p):
        out |= _tree(p, depth - 1)
  return out


def prepare(synth_dir: str, data_dir: str) -> FusionSynth:
  """Builds (or reuses) the TFDS dataset of `synth_dir` under `data_dir`; returns the builder.

  Raises ValueError (nothing left behind under `data_dir`) when `synth_dir` holds no record or
  when every record of a split is skipped.
  """
  files_by_split(synth_dir, log=False)  # fails early, before anything is created
  existed = os.path.isdir(data_dir)
  before = _tree(data_dir, 3)
  try:
    builder = FusionSynth(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(synth_dir)))
  except BaseException as e:
    # Longest paths first: children before their parents.
    for p in sorted(_tree(data_dir, 3) - before, key=len, reverse=True):
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
      elif os.path.lexists(p):
        os.remove(p)
    if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
      os.rmdir(data_dir)
    if isinstance(e, AssertionError) and "No examples were yielded" in str(e):
      raise ValueError(f"{synth_dir}: {e}; every record of that split was skipped while "
                       "preparing (see the warnings above: missing images, bad records)") from e
    raise
  return builder


# ----------------------------------------------------------------------------- reading


class TfdsSource:
  """Adapter: a `tfds.data_source` of the synthesized dataset (the builder above, registered
  by importing this module) -> sources_lib.RawSample.

  Works without TensorFlow: tfds array_record data sources decode with NumPy.
  """

  def __init__(self, name: str, data_dir: str = "", split: str = "train"):
    self.name, self.data_dir, self.split = name, data_dir, split
    try:
      self._ds = tfds.data_source(name, data_dir=data_dir or None, split=split)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, ValueError, ...)
      raise sources_lib.MixtureError(
          f"tfds data source {name!r} (data_dir={data_dir!r}, split={split!r}) cannot be opened: "
          f"{e}. Prepare it first: python -m fusion_jax.data.synth_tfds --synth_dir DIR "
          "--data_dir DATA_DIR") from None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> sources_lib.RawSample:
    where = f"tfds:{self.name}/{self.split}#{int(i)}"
    try:
      return tfds_example_to_raw(self._ds[int(i)], where)
    except (KeyError, TypeError, UnicodeDecodeError) as e:  # an example of another schema
      return sources_lib.RawSample(b"", where, "", None,
                                   ("bad_record", f"unexpected TFDS example: {e!r}"))

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


def _text(x: Any) -> str:
  if isinstance(x, np.ndarray):
    x = x.item() if x.shape == () else x
  return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def tfds_example_to_raw(ex: dict, where: str) -> sources_lib.RawSample:
  """A decoded example of the builder above (NumPy, no TF) -> a LLaVA record + embedded
  image."""
  conv = ex["conversations"]
  turns = [{"from": _text(f), "value": _text(v)} for f, v in zip(conv["from"], conv["value"])]
  rec: dict[str, Any] = {"id": _text(ex["id"]), "conversations": turns}
  image = ex["image"]
  image = image.item() if isinstance(image, np.ndarray) else image
  image_path = _text(ex.get("image_path", b""))
  if image:
    rec["image"] = image_path or "embedded"
  source = _text(ex.get("source", b"")) or where
  return sources_lib.RawSample(rec, source, "", bytes(image) if image else None)


PROG = "python -m fusion_jax.data.synth_tfds"


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli)."""
  flags.DEFINE_string("synth_dir", None, "output directory of fusion_jax.synth", flag_values=fv,
                      required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into", flag_values=fv,
                      required=True)


def _run(args) -> int:
  try:
    builder = prepare(args.synth_dir, args.data_dir)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"fusion_synth {builder.version} prepared in {builder.data_dir}: {splits}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(cli.parse(define_flags, argv, PROG))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG)
