"""Shared trainer helpers: the lr schedule, checkpoint atomicity and resharding restore, the metrics log."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from stat_jax import sharding
from stat_jax.train.checkpointing import CheckpointManager, abstract_state
from stat_jax.train.metrics import MetricsLogger, read_metrics
from stat_jax.train.optim import build_optimizer, learning_rate_schedule


def _train(**kw):
    base = dict(learning_rate=1.0, lr_schedule="cosine", warmup_steps=0, warmup_ratio=0.1, min_lr_ratio=0.1,
                weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0)
    return ConfigDict({**base, **kw})


def test_schedule_warms_up_then_decays_to_the_floor():
    lr = learning_rate_schedule(_train(), total_steps=100)  # warmup_ratio 0.1 -> 10 steps
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-4)  # cosine midpoint
    assert float(lr(100)) == pytest.approx(0.1)
    linear = learning_rate_schedule(_train(lr_schedule="linear", warmup_steps=0, warmup_ratio=0.0), 10)
    assert float(linear(5)) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_schedule(_train(lr_schedule="step"), 10)


def test_clipping_and_no_decay_on_vectors():
    tx, _ = build_optimizer(_train(weight_decay=0.5, warmup_ratio=0.0, lr_schedule="constant"), 10)
    params = {"w": jnp.ones((2, 2)), "norm": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert np.allclose(updates["w"], -0.5) and np.allclose(updates["norm"], 0.0)  # decay only on matrices


def test_checkpoint_restores_onto_another_mesh_and_ignores_partial_saves(tmp_path):
    mesh_a, mesh_b = sharding.make_mesh(1, 8, 1), sharding.make_mesh(2, 2, 2)
    spec = sharding.logical_to_spec(("embed", "mlp"))
    value = jnp.arange(64.0).reshape(8, 8)
    state = {"w": jax.device_put(value, jax.sharding.NamedSharding(mesh_a, spec)), "step": jnp.int32(3)}
    with CheckpointManager(tmp_path / "ck", save_every=1, keep=2) as ckpt:
        ckpt.save(3, state, {"data": {"epoch": 1}})
    # What a crash mid-save leaves behind: an uncommitted temporary step directory.
    (tmp_path / "ck" / "7.orbax-checkpoint-tmp-123").mkdir()
    ckpt = CheckpointManager(tmp_path / "ck", save_every=1, keep=2)
    assert ckpt.latest_step() == 3
    target_sh = {"w": jax.sharding.NamedSharding(mesh_b, spec), "step": sharding.replicated(mesh_b)}
    restored, meta = ckpt.restore(abstract_state(jax.eval_shape(lambda: state), target_sh))
    ckpt.close()
    assert meta == {"data": {"epoch": 1}} and int(restored["step"]) == 3
    assert restored["w"].sharding.spec == spec and restored["w"].sharding.mesh.shape == mesh_b.shape
    assert np.array_equal(np.asarray(restored["w"]), np.asarray(value))


def test_metrics_log_drops_rows_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, total_steps=5) as log:
        for step in range(1, 5):
            log.log(step, {"loss": float(step), "nan": float("nan")})
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a torn line from a kill -9
    with MetricsLogger(path, total_steps=5, start_step=2) as log:
        log.log(3, {"loss": 30.0})
    rows = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert rows[0]["nan"] == "nan" and json.loads(path.read_text().splitlines()[0])["step"] == 1
