"""benchmarks/packing_curve.py's attribution of a CPU trace to parts of the model (the op_name
rules behind docs/performance.md's table; the benchmark itself is too slow for the suite)."""
from experiment_helpers import load_benchmark


def test_cpu_parts_attributes_operations_by_op_name():
  pc = load_benchmark("packing_curve")
  fwd = "jit(step)/jvp(Fusion)/Fusion._forward"
  bwd = "jit(step)/transpose(jvp(Fusion))/Fusion._forward"
  op_names = {
      "f1": f"{fwd}/llm/layers_0/self_attn/bqkgd,bskd->bkgqs/dot_general",   # scores
      "f2": f"{bwd}/llm/layers_1/self_attn/q_proj/dot_general",              # a projection
      "f3": f"{fwd}/llm/layers_2/self_attn/apply_rope/mul",                  # RoPE
      "f4": f"{fwd}/Fusion.encode_images/vision_tower.features/layers_0/self_attn/div",
      "f5": f"{bwd}/mm_projector/linear_0/dot_general",
      "f6": f"{fwd}/llm/layers_0/mlp/jit(silu)/mul",
      "f7": f"{fwd}/llm/layers_0/post_attention_layernorm/mul",
      "f8": f"{fwd}/interaction_0/dot_general",
      "f9": "jit(step)/mul",                                                   # the update
      "f10": f"{fwd}/llm/embed_tokens/gather",
  }
  events = [{"ph": "X", "name": n, "dur": 1000 * (i + 1)} for i, n in enumerate(op_names)]
  events += [{"ph": "X", "name": "ThunkExecutor::Execute", "dur": 10**9},  # not an operation
             {"ph": "M", "name": "f1"}]
  parts = pc.cpu_parts(events, op_names, steps=1)
  assert parts == {
      "decoder attention: scores, mask, softmax": 1.0,
      "decoder q/k/v/o projections, RoPE": 2.0 + 3.0,
      "tower and projectors": 4.0 + 5.0,
      "decoder MLP": 6.0, "decoder norms": 7.0, "interaction layers": 8.0,
      "optimizer update": 9.0, "embeddings, LM head, loss, scatter": 10.0}
  assert list(parts)[0] == "embeddings, LM head, loss, scatter"  # largest first
