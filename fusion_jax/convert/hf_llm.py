"""transformers Llama / Phi-3 causal-LM weights <-> fusion_jax.models.llm.Decoder params.

One table (`llm_tensor_table`) lists every torch tensor with the Flax leaves it holds and how the
layout changes; import (`llm_params_from_reader`) and export (`llm_tensors_to_torch`) both walk
it, so the two directions cannot drift. Layouts:

  copy       same array both sides (embedding (V, D), norm scales (D,))
  dense      torch Linear (out, in)     <-> Flax (in, out)
  heads_out  torch Linear (N*hd, D)     <-> Flax (D, N, hd)     q/k/v projections
  heads_in   torch Linear (D, H*hd)     <-> Flax (H, hd, D)     o_proj

Phi-3 stores fused tensors: qkv_proj (rows q | k | v) and gate_up_proj (rows gate | up); the
table splits their rows on import and concatenates them on export.

Tensors are read, converted and placed one at a time (never two full copies of the model).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from fusion_jax.models.llm_config import LLMConfig

Path = tuple[str, ...]

# Keys older checkpoints carry that hold no weights (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One torch tensor: its key, shape, and the Flax leaves its row blocks map to."""
  key: str
  shape: tuple[int, ...]
  layout: str                                    # copy | dense | heads_out | heads_in
  parts: tuple[tuple[Path, tuple[int, ...]], ...]  # (flax path, flax shape), in torch row order


def _lm_head_key(prefix: str) -> str:
  # transformers puts lm_head beside the base model: 'model.' -> 'lm_head.weight',
  # 'language_model.model.' -> 'language_model.lm_head.weight'.
  base = prefix[: -len("model.")] if prefix.endswith("model.") else prefix
  return f"{base}lm_head.weight"


def llm_tensor_table(cfg: LLMConfig, prefix: str = "model.") -> list[TensorSpec]:
  """Every torch tensor of a transformers LlamaForCausalLM / Phi3ForCausalLM, in file order."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  specs = [TensorSpec(f"{prefix}embed_tokens.weight", (v, d), "copy",
                      ((("embed_tokens", "embedding"), (v, d)),))]
  for i in range(cfg.num_layers):
    lp = f"{prefix}layers.{i}."
    L = f"layers_{i}"
    q = ((L, "self_attn", "q_proj", "kernel"), (d, h, hd))
    k = ((L, "self_attn", "k_proj", "kernel"), (d, kv, hd))
    vv = ((L, "self_attn", "v_proj", "kernel"), (d, kv, hd))
    gate = ((L, "mlp", "gate_proj", "kernel"), (d, f))
    up = ((L, "mlp", "up_proj", "kernel"), (d, f))
    specs.append(TensorSpec(f"{lp}input_layernorm.weight", (d,), "copy",
                            (((L, "input_layernorm", "scale"), (d,)),)))
    if cfg.arch == "phi3":
      specs.append(TensorSpec(f"{lp}self_attn.qkv_proj.weight", ((h + 2 * kv) * hd, d), "heads_out",
                              (q, k, vv)))
    else:
      specs += [TensorSpec(f"{lp}self_attn.q_proj.weight", (h * hd, d), "heads_out", (q,)),
                TensorSpec(f"{lp}self_attn.k_proj.weight", (kv * hd, d), "heads_out", (k,)),
                TensorSpec(f"{lp}self_attn.v_proj.weight", (kv * hd, d), "heads_out", (vv,))]
    specs.append(TensorSpec(f"{lp}self_attn.o_proj.weight", (d, h * hd), "heads_in",
                            (((L, "self_attn", "o_proj", "kernel"), (h, hd, d)),)))
    specs.append(TensorSpec(f"{lp}post_attention_layernorm.weight", (d,), "copy",
                            (((L, "post_attention_layernorm", "scale"), (d,)),)))
    if cfg.arch == "phi3":
      specs.append(TensorSpec(f"{lp}mlp.gate_up_proj.weight", (2 * f, d), "dense", (gate, up)))
    else:
      specs += [TensorSpec(f"{lp}mlp.gate_proj.weight", (f, d), "dense", (gate,)),
                TensorSpec(f"{lp}mlp.up_proj.weight", (f, d), "dense", (up,))]
    specs.append(TensorSpec(f"{lp}mlp.down_proj.weight", (d, f), "dense",
                            (((L, "mlp", "down_proj", "kernel"), (f, d)),)))
  specs.append(TensorSpec(f"{prefix}norm.weight", (d,), "copy", ((("norm", "scale"), (d,)),)))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec(_lm_head_key(prefix), (v, d), "dense",
                            ((("lm_head", "kernel"), (d, v)),)))
  return specs


def _torch_rows(flax_shape: tuple[int, ...], layout: str) -> int:
  """How many torch rows (dim 0) one Flax leaf occupies."""
  if layout == "copy":
    return flax_shape[0]
  if layout == "dense":
    return flax_shape[-1]
  if layout == "heads_out":
    return flax_shape[1] * flax_shape[2]
  if layout == "heads_in":
    return flax_shape[-1]
  raise ValueError(layout)


def _to_flax(block: np.ndarray, layout: str, flax_shape: tuple[int, ...]) -> np.ndarray:
  if layout == "copy":
    return block
  if layout in ("dense", "heads_out", "heads_in"):
    return np.ascontiguousarray(block.T).reshape(flax_shape)
  raise ValueError(layout)


def _to_torch(leaf: np.ndarray, layout: str) -> np.ndarray:
  if layout == "copy":
    return leaf
  if layout == "dense":
    return leaf.T
  if layout == "heads_out":  # (D, N, hd) -> (N*hd, D)
    return leaf.reshape(leaf.shape[0], -1).T
  if layout == "heads_in":   # (H, hd, D) -> (D, H*hd)
    return leaf.reshape(-1, leaf.shape[-1]).T
  raise ValueError(layout)


def _owned(key: str, prefix: str, lm_head_key: str) -> bool:
  """Is `key` in the LLM's namespace (so an unexpected one is an error, not someone else's)?"""
  if key == lm_head_key:
    return True
  return key.startswith(prefix) and key[len(prefix):].split(".")[0] in ("embed_tokens", "layers", "norm")


def _listed(keys: list[str]) -> str:
  shown = ", ".join(keys[:_MAX_LISTED])
  return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_llm_checkpoint(reader, cfg: LLMConfig, prefix: str = "model.", strict: bool = True) -> list[TensorSpec]:
  """Validates names and shapes against `cfg` without loading any tensor data.

  Raises one ValueError listing every missing tensor, unexpected tensor (strict) and shape
  mismatch. Returns the table.
  """
  table = llm_tensor_table(cfg, prefix)
  present = set(reader.keys())
  expected = {s.key for s in table}
  where = getattr(reader, "directory", "checkpoint")
  problems = []
  missing = [s.key for s in table if s.key not in present]
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listed(missing)}")
  lm_key = _lm_head_key(prefix)
  if strict:
    extra = sorted(k for k in present if _owned(k, prefix, lm_key) and k not in expected
                   and not k.endswith(IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and k == lm_key))
    if extra:
      problems.append(f"unexpected tensors ({len(extra)}): {_listed(extra)}")
  bad = []
  for s in table:
    if s.key in present:
      got = tuple(reader.shape(s.key))
      if got != s.shape:
        bad.append(f"{s.key}: checkpoint {got} vs config {s.shape}")
  if bad:
    problems.append(f"shape mismatches ({len(bad)}): " + "; ".join(bad[:_MAX_LISTED]))
  if problems:
    raise ValueError(
        f"{where}: checkpoint does not match the LLM config (arch={cfg.arch}, "
        f"layers={cfg.num_layers}, D={cfg.hidden_size}, heads={cfg.num_heads}/{cfg.num_kv_heads}, "
        f"vocab={cfg.vocab_size}, tensor prefix {prefix!r}):\n  " + "\n  ".join(problems)
        + "\nCheck that config.json belongs to these weights and that the prefix is right.")
  return table


def _set(tree: dict, path: Path, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def llm_params_from_reader(reader, cfg: LLMConfig, prefix: str = "model.", *,
                           dtype: Any = None, strict: bool = True) -> dict[str, Any]:
  """Reads a transformers LLM into the unscanned Decoder params tree (numpy, nested dicts).

  reader: anything with keys() / shape(key) / get(key) -> np.ndarray (SafetensorsReader).
  dtype: cast every leaf (e.g. np.float32); None keeps the stored dtype.
  strict: unexpected tensors in the LLM namespace (extra layers, ...) are an error.
  """
  table = check_llm_checkpoint(reader, cfg, prefix, strict)
  params: dict[str, Any] = {}
  for spec in table:
    arr = reader.get(spec.key)
    if dtype is not None:
      arr = arr.astype(dtype, copy=False)
    start = 0
    for path, flax_shape in spec.parts:
      rows = _torch_rows(flax_shape, spec.layout)
      _set(params, path, _to_flax(arr[start:start + rows], spec.layout, flax_shape))
      start += rows
    del arr
  return params


def _leaf(params: Mapping[str, Any], path: Path) -> np.ndarray:
  """Leaf at an unscanned path; also reads the scanned layout (`layers` with a layer axis)."""
  layer = None
  if path[0].startswith("layers_") and path[0] not in params and "layers" in params:
    layer = int(path[0].split("_")[1])
    path = ("layers",) + path[1:]
  node: Any = params
  for p in path:
    if not isinstance(node, Mapping) or p not in node:
      raise KeyError(f"params: missing {'/'.join(path)}")
    node = node[p]
  node = getattr(node, "value", node)  # nn.Partitioned boxes
  arr = np.asarray(node if layer is None else node[layer])
  return arr


def llm_tensors_to_torch(params: Mapping[str, Any], cfg: LLMConfig, prefix: str = "model.", *,
                         dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (transformers key, array) for every tensor of the causal LM, one at a time.

  params: Decoder params (bare tree or {'params': tree}; unscanned or scanned layout; numpy or
  jax arrays). Linear weights come out (out_features, in_features); Phi-3 tensors re-fused.
  """
  if "params" in params and len(params) == 1:
    params = params["params"]
  for spec in llm_tensor_table(cfg, prefix):
    pieces = []
    for path, flax_shape in spec.parts:
      leaf = _leaf(params, path)
      if tuple(leaf.shape) != flax_shape:
        raise ValueError(f"params/{'/'.join(path)}: shape {tuple(leaf.shape)} vs config {flax_shape}")
      pieces.append(_to_torch(leaf, spec.layout))
    out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    out = np.ascontiguousarray(out if dtype is None else out.astype(dtype))
    assert out.shape == spec.shape, (spec.key, out.shape, spec.shape)
    yield spec.key, out
