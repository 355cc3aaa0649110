"""Tasks the generic trainer (fusion_jax.train) runs: a model + its data behind the Task protocol
(fusion_jax/train/task.py).

  fusion.py     FusionTask (registered as config.task = "fusion" when imported), the paper's
                training recipe (STAGES, stage_config) and the config -> FusionConfig /
                DataConfig / tokenizer rules that infer, eval and the main job share
  preflight.py  FUSION's startup checks (FusionTask.preflight): model, data files, tokenizer

train/ imports nothing from here: an experiment config names the task.
"""
