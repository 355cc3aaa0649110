"""Small tokenizers built locally for the data tests (sentencepiece Phi-style, BPE Llama-3-style)."""
import random

import pytest

from fusion_jax.data.tokenizer import load_tokenizer
from fusion_jax.data.tokenizer_train import train_bpe_tokenizer_json, train_sentencepiece

WORDS = ("the a red blue green cat dog sits on mat image shows two three colour what is in "
         "picture yes no left right of you are helpful assistant language vision").split()


def corpus(n=300, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  train_sentencepiece(corpus(), str(d / "tokenizer"), 320)
  return load_tokenizer(str(d))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  train_bpe_tokenizer_json(corpus(), str(d), 400)
  return load_tokenizer(str(d))
