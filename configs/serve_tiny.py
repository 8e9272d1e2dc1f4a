"""Serving a tiny student over JetStream gRPC on 127.0.0.1 (plumbing check; give --config.model.path=DIR)."""

from pathlib import Path

from stat_jax.config import load_config_file


def get_config():
    c = load_config_file(str(Path(__file__).with_name("base.py")))
    c.workdir = "runs/serve_tiny"
    c.model.dtype = "float32"
    c.mesh.fsdp = 1  # one device is plenty for a tiny model
    c.rollout.max_concurrent_decodes = 4
    c.rollout.max_prefill_length = 64
    c.rollout.max_target_length = 128
    c.rollout.port = 9000
    return c
