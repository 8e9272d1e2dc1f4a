"""Evaluate a student on the STAT paper's benchmarks: MATH (in distribution), GSM8K, AMC23, AIME 2024/2025.

  stat-jax eval --config=configs/eval_paper.py --config.model.path=/path/to/student \
      [--config.eval.paths.math=/data/math_test.jsonl ...]   # local copies when the hub is unreachable

Greedy pass@1 everywhere; add --config.eval.num_samples=16 for avg@16 / pass@j on the small sets.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/eval_paper"
    c.eval.benchmarks = ("math", "gsm8k", "amc23", "aime24", "aime25")
    c.eval.max_new_tokens = 4096
    # The cache holds the longest prompt the prefill admits plus every new token (stat_jax/lengths.py).
    c.rollout.max_target_length = c.rollout.max_prefill_length + c.eval.max_new_tokens
    return c
