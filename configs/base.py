"""Defaults shared by every stat-jax command. Each section belongs to one part of the package:

  model / mesh     stat_jax.models, stat_jax.sharding
  data / train     stat_jax.train.sft (SFT data, optimizer, checkpoints)
  rollout          stat_jax.rollout (JetStream engine, sampling)
  eval             stat_jax.eval
  teacher          stat_jax.teacher
  stat             stat_jax.stat (pipeline stages)
  grpo             stat_jax.train.grpo

Experiment files (`configs/sft_qwen2_5_3b.py`, ...) start from `get_config()` here and change what
they need; every field can be overridden with `--config.section.field=value`.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"  # everything a run writes goes under here

    c.model = ConfigDict()
    c.model.path = ""  # local HF checkpoint directory, or a hub name (needs network)
    c.model.tokenizer_path = ""  # defaults to model.path
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = False

    c.mesh = ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1
    return c
