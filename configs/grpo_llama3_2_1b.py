"""GRPO of a STAT-trained Llama-3.2-1B-Instruct student on MATH, with the paper's recipe (configs/stat_paper.py):
constant lr 5e-7, 256 prompts x 4 samples per batch, responses <= 2,048 tokens, no KL, the verifiable math reward.

`stat-jax grpo --config=configs/grpo_llama3_2_1b.py --config.model.path=runs/stat_sel/sft/hf
--config.grpo.train_files=math_train.jsonl`
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(f"{Path(__file__).with_name('stat_paper.py')}:llama3_2_1b,sel")
    c.workdir = "runs/grpo_llama3_2_1b"
    return c
