"""STAT-Syn for Qwen2.5-3B (the base model), the paper's recipe: `stat-jax run --config=configs/stat_syn_qwen2_5_3b.py`.

Every figure is in configs/stat_paper.py (variant qwen2_5_3b,syn), with where in the paper it comes from. Needs
GEMINI_API_KEY (or Vertex AI settings) for the teacher; `--only=profile` runs a single stage. The GRPO stages,
added with `--config.stat.stages=...,sft,eval,grpo,eval_grpo`, train on the run's MATH training questions.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    return load_config_file(f"{Path(__file__).with_name('stat_paper.py')}:qwen2_5_3b,syn")
