"""STAT-Syn for Llama-3.2-1B-Instruct (the paper's setting): `stat-jax run --config=configs/stat_syn_llama3_2_1b.py`.

Needs GEMINI_API_KEY (or Vertex AI settings) for the teacher; `--only=profile` runs a single stage.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/stat_syn_llama3_2_1b"
    c.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    c.stat.method = "syn"
    c.stat.stages = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile", "syn", "sft", "eval")
    c.eval.benchmarks = ("math500", "aime24", "aime25", "amc23", "gsm8k")
    return c
