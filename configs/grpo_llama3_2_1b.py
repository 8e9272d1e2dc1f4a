"""GRPO of a STAT-trained Llama-3.2-1B-Instruct student on MATH with the verifiable math reward.

`stat-jax grpo --config=configs/grpo_llama3_2_1b.py --config.model.path=runs/stat_sel/sft/hf
--config.grpo.train_files=math_train.jsonl`
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/grpo_llama3_2_1b"
    c.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    c.rollout.max_concurrent_decodes = 128
    c.rollout.max_prefill_length = 512
    c.rollout.max_target_length = 1536
    c.grpo.max_length = 1536
    c.grpo.max_new_tokens = 1024
    c.grpo.prompts_per_step = 32
    c.grpo.num_generations = 8
    c.grpo.micro_batches = 8
    c.grpo.learning_rate = 1e-6
    return c
