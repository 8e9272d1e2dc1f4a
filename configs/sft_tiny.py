"""A seconds-long SFT of a tiny student on CPU (tests, plumbing checks).

Point it at a local HF directory and data: `stat-jax sft --config=configs/sft_tiny.py
--config.model.path=DIR --config.data.train_files=train.jsonl`.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/sft_tiny"
    c.model.dtype = "float32"  # tests compare against float32 references
    c.mesh.fsdp = -1
    c.data.max_length = 64
    c.train.steps = 10
    c.train.batch_size = 8
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 2
    c.train.checkpoint_every = 5
    c.train.keep_checkpoints = 2
    c.train.tensorboard = False
    return c
