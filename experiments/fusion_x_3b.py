r"""FUSION-X 3B (Phi-3.5-mini + SigLIP2 giant-opt/16@384): the paper's recipe (docs/model.md §10).

ARG       data                 batch  lr    tower lr  max len  starts from
stage1    FUSION-Pretrain-10M  256    2e-5  2e-5      2048     BASE_MODEL
stage1_5  FUSION-5M-Stage1.5   128    2e-5  2e-6      4096     RUN_ROOT/stage1
stage2    FUSION-7M-Stage2     128    1e-5  1e-6      4096     RUN_ROOT/stage1_5

Before stage 1, import the base model (writes BASE_MODEL with params/ and tokenizer/):

  python -m fusion_jax.convert.import_hf --llm /path/to/Phi-3.5-mini-instruct \
      --vision /path/to/siglip2-giant-opt-patch16-384 --preset fusion_x_3b \
      --out /path/to/fusion_x_3b_base

Then on a v5p-128 slice (64 chips, 16 hosts; launch/README.md), one stage after the other:

  export TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-project
  launch/tpu_pod.sh train experiments/fusion_x_3b.py:stage1 gs://YOUR_BUCKET/fusion_x_3b/stage1

which runs on every host:

  python -m fusion_jax.train --multihost=true --config experiments/fusion_x_3b.py:stage1 \
      --workdir gs://YOUR_BUCKET/fusion_x_3b/stage1

Edit the paths below or override them: --config.data.mixture=... --config.data.image_root=...
--config.data.tokenizer=... --config.init_from=... (the recipe: fusion_jax.task.fusion.STAGES).
"""
from fusion_jax.task.fusion import STAGES, stage_config

CONFIG_ARGS = tuple(STAGES)
DATA_ROOT = "/path/to/fusion_data"           # <DATA_ROOT>/<dataset>/mixture.yaml per stage
IMAGE_ROOT = "/path/to/fusion_data/images"   # relative image paths of the records
BASE_MODEL = "/path/to/fusion_x_3b_base"     # import_hf output (stage 1 start + tokenizer)
RUN_ROOT = "gs://YOUR_BUCKET/fusion_x_3b"    # stage workdirs: <RUN_ROOT>/<stage>


# Remat: keep the weight matmuls' outputs and the attention kernel's output and softmax
# statistics, recompute the rest (fusion_jax.parallel.remat). On the documented v5p-128 it fits
# every stage (python -m fusion_jax.aot, per-chip peak of 95 GiB: stage1 77.2, stage2 53.1 and
# stage1_5 has stage2's shapes, against 29.6 / 19.9 with full remat; docs/performance.md, "Fit
# on TPU slices"). On fewer chips use --config.remat_policy=full.
REMAT_POLICY = "dots_with_no_batch_dims_and_attention"


def get_config(arg: str = "stage1"):
  c = stage_config("fusion_x_3b", arg, data_root=DATA_ROOT, image_root=IMAGE_ROOT,
                   base_model=BASE_MODEL, run_root=RUN_ROOT)
  c.remat_policy = REMAT_POLICY
  return c
