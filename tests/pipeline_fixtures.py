"""Tiny on-disk LLaVA datasets and a tiny tokenizer for the data pipeline tests.

Every record's answer names its index ("answer 17"), so a test can tell which samples a batch
holds by decoding the supervised tokens (`batch_sample_ids`).
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import pytest
from PIL import Image

from fusion_jax.data.tokenizer import load_tokenizer
from fusion_jax.data.tokenizer_train import train_sentencepiece

_CORPUS = [
    "What color is the ball? The ball is red.", "How many cats are there? There are 3 cats.",
    "Describe the scene in detail please.", "answer 0 1 2 3 4 5 6 7 8 9 question image",
    "Where is the dog? The dog is on the left of the tree.",
]

# Small shapes: 5 crops of 28 px, 4 image tokens, q in {1, 4}.
TINY_CFG = dict(image_size=28, num_image_tokens=4, seq_len=96, max_questions=2,
                max_instruct_len=16, query_len=(1, 4), batch_size=2, seed=3, read_threads=2,
                read_buffer=4, prefetch=0, worker_count=0)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, request):
  """A temporary directory per test module."""
  return str(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="module")
def tok(tmp):
  """The tiny tokenizer of `make_tokenizer`, one per test module."""
  return make_tokenizer(tmp)


def make_tokenizer(tmp_dir: str):
  """A ~300-piece sentencepiece tokenizer with the Phi-3 chat tokens (trains in < 0.5 s)."""
  d = os.path.join(tmp_dir, "tok")
  if not os.path.isdir(d):
    train_sentencepiece(_CORPUS * 10, os.path.join(d, "tokenizer"), 300)
  return load_tokenizer(d)


def png_bytes(value: int, size=(40, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, (value % 256, 7, 200)).save(buf, "PNG")
  return buf.getvalue()


def good_record(i: int, image: bool) -> dict:
  rec = {"id": f"s{i}", "conversations": [
      {"from": "human", "value": ("<image>\n" if image else "") + f"question {i}?"},
      {"from": "gpt", "value": f"answer {i}"}]}
  if image:
    rec["image"] = f"img/{i}.png"
  return rec


def write_dataset(root: str, n: int, *, name: str = "data.json", start: int = 0,
                  image_every: int = 2, extra: list | None = None) -> str:
  """n good records (every `image_every`-th has a PNG) [+ extra records]; .json or .jsonl."""
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  recs = []
  for i in range(start, start + n):
    image = image_every > 0 and i % image_every == 0
    if image:
      with open(os.path.join(root, "img", f"{i}.png"), "wb") as f:
        f.write(png_bytes(i))
    recs.append(good_record(i, image))
  recs += list(extra or [])
  path = os.path.join(root, name)
  with open(path, "w") as f:
    if name.endswith(".jsonl"):
      for r in recs:
        f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    else:
      json.dump(recs, f)
  return path


def batch_sample_ids(batch: dict, tokenizer) -> list[int]:
  """Index i of every real example of a batch, read from its supervised 'answer i' tokens."""
  out = []
  for row_ids, row_labels, mask in zip(batch["input_ids"], batch["labels"], batch["token_mask"]):
    if not mask.any():
      continue
    sup = row_ids[row_labels != -100]
    m = re.search(r"answer\s*(\d+)", tokenizer.decode(sup.tolist()).replace(" ", ""))
    assert m, tokenizer.decode(sup.tolist())
    out.append(int(m.group(1)))
  return out


def assert_batches_equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def batch_partition_spec(mesh: jax.sharding.Mesh,
                         batch_axes: Sequence[str] = ("data", "fsdp")) -> jax.sharding.PartitionSpec:
  """PartitionSpec sharding the leading (batch) dim over the mesh's data-parallel axes."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return jax.sharding.PartitionSpec(axes if axes else None)


def to_global_batch(host_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                    batch_sharding: jax.sharding.PartitionSpec | jax.sharding.NamedSharding
                    | None = None) -> dict[str, jax.Array]:
  """Assembles every host's batch into global jax.Arrays (batch dim = sum over hosts).

  Args:
    host_batch: this host's batch, {key: (B_host, ...) array}.
    mesh: the device mesh.
    batch_sharding: PartitionSpec (or NamedSharding) of the batch dimension; default shards
      it over the mesh's ("data", "fsdp") axes; trailing dims are replicated.

  Uses jax.make_array_from_process_local_data, so each host passes only its own rows; the
  local batch must divide evenly over this host's devices along the sharded axes.
  """
  if batch_sharding is None:
    spec = batch_partition_spec(mesh)
  elif isinstance(batch_sharding, jax.sharding.NamedSharding):
    spec = batch_sharding.spec
  else:
    spec = batch_sharding
  lead = spec[0] if len(spec) else None
  out = {}
  for k, v in host_batch.items():
    v = np.asarray(v)
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(lead, *([None] * (v.ndim - 1))))
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
