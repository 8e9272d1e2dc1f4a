"""SFT of Llama-3.2-3B-Instruct with the STAT paper's recipe (configs/stat_paper.py): bf16 compute, float32 master
weights, 3 epochs, cosine with 3% warmup, 8 QA pairs per update, clipping 0.3, weight decay 0.1.

`stat-jax sft --config=configs/sft_llama3_2_3b.py --config.data.train_files=stat_sel.jsonl
--config.model.path=/path/to/checkpoint --config.mesh.fsdp=8`

A batch of 8 unpacked rows splits over at most 8 devices of the data/fsdp axes; on a larger mesh raise
train.batch_size (and re-tune the learning rate) or set data.packing=true.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(f"{Path(__file__).with_name('stat_paper.py')}:llama3_2_3b,sel")
    c.workdir = "runs/sft_llama3_2_3b"
    return c
