"""Serving a Llama-3.2-1B-shaped student (e.g. an SFT export) over JetStream gRPC on one host.

`stat-jax serve --config=configs/serve_llama3_2_1b.py --config.model.path=runs/.../hf_export`; the coordinator
then uses `--config.rollout.backend=client --config.rollout.address=HOST:9000`.
"""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/serve_llama3_2_1b"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # serving needs no float32 master weights
    c.rollout.max_concurrent_decodes = 128
    c.rollout.max_prefill_length = 1024  # MATH prompts with a chat template stay well below this
    c.rollout.max_target_length = 1024 + 2048 + 64  # + eval/stat max_new_tokens
    return c
