"""SFT of Llama-3.2-3B-Instruct on a TPU/GPU slice: bf16 compute, float32 master weights.

`stat-jax sft --config=configs/sft_llama3_2_3b.py --config.data.train_files=stat_sel.jsonl
--config.model.path=/path/to/Llama-3.2-3B-Instruct --config.mesh.fsdp=8`
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    # The same recipe as the 1B student (bf16 compute, f32 master weights, remat, 2048-token rows).
    c = load_config_file(str(Path(__file__).with_name("sft_llama3_2_1b.py")))
    c.workdir = "runs/sft_llama3_2_3b"
    c.model.path = "meta-llama/Llama-3.2-3B-Instruct"
    return c
