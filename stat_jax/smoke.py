"""`stat-jax smoke`: builds a tiny random Llama sharded over all devices and runs one forward pass."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp

from stat_jax import sharding
from stat_jax.models import init_model, param_count
from stat_jax.models.llama import tiny_llama


def main(config, args) -> int:
    mesh = sharding.mesh_from_config(config.mesh)
    cfg = tiny_llama()
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        model = init_model(cfg, mesh, seed=config.seed)
        tokens = jax.random.randint(jax.random.key(config.seed), (config.batch_size, config.seq_len), 0, cfg.vocab_size)
        logits = model(tokens)
    report = {
        "devices": [str(d) for d in jax.devices()],
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "params": param_count(model),
        "logits_shape": list(logits.shape),
        "logits_finite": bool(jnp.isfinite(logits).all()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["logits_finite"] else 1
