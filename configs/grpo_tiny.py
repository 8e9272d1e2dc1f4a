"""A seconds-long GRPO run of a tiny student on CPU (tests, plumbing checks)."""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/grpo_tiny"
    c.model.dtype = "float32"
    c.rollout.max_concurrent_decodes = 16
    c.rollout.max_prefill_length = 64
    c.rollout.max_target_length = 96
    c.grpo.steps = 10
    c.grpo.prompts_per_step = 4
    c.grpo.num_generations = 4
    c.grpo.max_length = 96
    c.grpo.max_new_tokens = 8
    c.grpo.learning_rate = 1e-2
    c.grpo.checkpoint_every = 5
    c.grpo.async_checkpointing = False
    return c
