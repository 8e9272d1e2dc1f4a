"""Smoke test of an installation: a forward pass of a tiny random Llama on the available devices."""

from ml_collections import ConfigDict


def get_config():
    c = ConfigDict()
    c.seed = 0
    c.batch_size = 2
    c.seq_len = 16
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return c
