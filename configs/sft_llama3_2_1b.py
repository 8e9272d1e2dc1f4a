"""SFT of Llama-3.2-1B-Instruct (STAT's student) on a TPU/GPU slice: bf16 compute, float32 master weights.

`stat-jax sft --config=configs/sft_llama3_2_1b.py --config.data.train_files=stat_sel.jsonl
--config.model.path=/path/to/Llama-3.2-1B-Instruct --config.mesh.fsdp=8`
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/sft_llama3_2_1b"
    c.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "full"  # 2048-token rows x 64: activations dominate memory without it
    c.data.max_length = 2048
    c.train.epochs = 3.0
    c.train.batch_size = 64
    c.train.learning_rate = 1e-5
    c.train.warmup_ratio = 0.03
    c.train.export_dtype = "bfloat16"
    return c
