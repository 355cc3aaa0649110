"""Tiny pretrained base models for the main job (issue 16), built from synthesized data.

The paper starts FUSION from a pretrained SigLIP tower and a pretrained LLM (import_hf). At
tiny scale neither exists, so this package makes both once, from a seed range disjoint from the
main job's dataset, and writes them in the transformers layouts the project imports:

  pairs.py    image / caption / QA items from fusion_jax.synth (PRETRAIN_SEED, never the main
              job's seed), and the image hashes the disjointness test compares
  siglip.py   SigLIP's sigmoid loss (learned temperature and bias), over a batch's captions
              and over each scene's own candidate answers (hard negatives)
  tower.py    trains a tiny SigLIP tower with both sigmoid terms and a dense per-patch term
              (what covers each patch, the background; a tiny text transformer, the MAP head
              and the dense head are not shipped) -> SiglipVisionModel dir
  lm.py       sentencepiece tokenizer + a tiny Phi-3 LM on the synthesized text in the chat
              template -> Phi3ForCausalLM dir with its tokenizer
  refine.py   an optional later phase for a pretrained tower: dense targets only, plus each
              object's shape from its own tokens (python -m fusion_jax.pretrain.refine; the
              shipped tower is not refined: assets/tiny_bases/README.md says why)

  python -m fusion_jax.pretrain --out assets/tiny_bases
"""
