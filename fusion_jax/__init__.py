"""FUSION multimodal LLM in JAX/Flax Linen."""
