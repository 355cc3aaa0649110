r"""FUSION 8B (Llama-3.1-8B + SigLIP so400m/14@384): the paper's recipe (docs/model.md §10).

ARG       data                 batch  lr    tower lr  max len  starts from
stage1    FUSION-Pretrain-10M  256    2e-5  2e-5      2048     BASE_MODEL
stage1_5  FUSION-5M-Stage1.5   128    2e-5  2e-6      4096     RUN_ROOT/stage1
stage2    FUSION-7M-Stage2     128    1e-5  1e-6      4096     RUN_ROOT/stage1_5

Before stage 1, import the base model (writes BASE_MODEL with params/ and tokenizer/):

  python -m fusion_jax.convert.import_hf --llm /path/to/Llama-3.1-8B-Instruct \
      --vision /path/to/siglip-so400m-patch14-384 --preset fusion_8b \
      --out /path/to/fusion_8b_base

Then on a v5p-128 slice (64 chips, 16 hosts; launch/README.md), one stage after the other:

  export TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-project
  launch/tpu_pod.sh train experiments/fusion_8b.py:stage1 gs://YOUR_BUCKET/fusion_8b/stage1

which runs on every host:

  python -m fusion_jax.train --multihost=true --config experiments/fusion_8b.py:stage1 \
      --workdir gs://YOUR_BUCKET/fusion_8b/stage1

Edit the paths below or override them: --config.data.mixture=... --config.data.image_root=...
--config.data.tokenizer=... --config.init_from=... (the recipe: fusion_jax.task.fusion.STAGES).
"""
from fusion_jax.task.fusion import STAGES, stage_config

CONFIG_ARGS = tuple(STAGES)
DATA_ROOT = "/path/to/fusion_data"           # <DATA_ROOT>/<dataset>/mixture.yaml per stage
IMAGE_ROOT = "/path/to/fusion_data/images"   # relative image paths of the records
BASE_MODEL = "/path/to/fusion_8b_base"       # import_hf output (stage 1 start + tokenizer)
RUN_ROOT = "gs://YOUR_BUCKET/fusion_8b"      # stage workdirs: <RUN_ROOT>/<stage>


# Remat per stage (fusion_jax.parallel.remat; python -m fusion_jax.aot on the documented v5p-128,
# per-chip peak of 95 GiB), with the loss in 8 token chunks (config.loss_chunks): Llama-3's
# 128k-token vocabulary makes the whole (B, S, V) fp32 logits and their gradient cost 6-7 GiB
# per chip. Stage 1 (256 x 2048 tokens) keeps the weight matmuls' outputs: 78.8 (81.5 without
# the chunks; keeping the attention residuals too would need 84.2; 46.6 with full remat).
# Stages 1.5 and 2 (128 x 4096, the same shapes) also keep the attention kernel's residuals:
# 61.7 at stage 2 (68.6 without the chunks, 35.0 with full remat). Lighter remat ran about 8 %
# faster per step than full remat on an H200 at FUSION 3B width (docs/performance.md, "Speed on
# accelerators"). On fewer chips use --config.remat_policy=full.
REMAT_POLICY = {"stage1": "dots_with_no_batch_dims",
                "stage1_5": "dots_with_no_batch_dims_and_attention",
                "stage2": "dots_with_no_batch_dims_and_attention"}
LOSS_CHUNKS = 8


def get_config(arg: str = "stage1"):
  c = stage_config("fusion_8b", arg, data_root=DATA_ROOT, image_root=IMAGE_ROOT,
                   base_model=BASE_MODEL, run_root=RUN_ROOT)
  c.remat_policy = REMAT_POLICY[arg]
  c.loss_chunks = LOSS_CHUNKS
  return c
