"""STAT-Syn for Llama-3.2-1B-Instruct (the paper's setting): `stat-jax run --config=configs/stat_syn_llama3_2_1b.py`.

The STAT-Sel config (configs/stat_sel_llama3_2_1b.py) with the synthesized set in place of the selected one:
same student, teacher, SFT and GRPO recipes and evaluation.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("stat_sel_llama3_2_1b.py")))
    c.workdir = "runs/stat_syn_llama3_2_1b"
    c.stat.method = "syn"
    c.stat.stages = tuple("syn" if name == "sel" else name for name in c.stat.stages)
    return c
