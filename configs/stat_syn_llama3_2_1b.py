"""STAT-Syn for Llama-3.2-1B-Instruct (the paper's setting): `stat-jax run --config=configs/stat_syn_llama3_2_1b.py`.

Needs GEMINI_API_KEY (or Vertex AI settings) for the teacher; `--only=profile` runs a single stage.
The SFT stage uses the 1B SFT recipe (configs/sft_llama3_2_1b.py); the optional GRPO stages, added with
`--config.stat.stages=data,skills,...,sft,eval,grpo,eval_grpo`, use the 1B GRPO recipe's `grpo` section
and default to the run's MATH training questions (data/train.jsonl) as prompts.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("sft_llama3_2_1b.py")))
    c.grpo = load_config_file(str(Path(__file__).with_name("grpo_llama3_2_1b.py"))).grpo
    c.workdir = "runs/stat_syn_llama3_2_1b"
    c.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    c.stat.method = "syn"
    c.stat.stages = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile", "syn", "sft", "eval")
    c.eval.benchmarks = ("math500", "aime24", "aime25", "amc23", "gsm8k")
    return c
