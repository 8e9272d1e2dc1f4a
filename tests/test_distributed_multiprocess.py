"""Multi-host for real: 2 local CPU processes x 4 fake devices joined by jax.distributed on 127.0.0.1 run
`stat-jax sft` through the CLI; the result equals a single-process run on 8 devices with the same global batch,
and the checkpoint the pair wrote restores in this single process (onto another mesh shape)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
from flax import nnx
from safetensors.numpy import load_file

from stat_jax import sharding
from stat_jax.config import build_config
from stat_jax.models import abstract_model
from stat_jax.models.config import ModelConfig
from stat_jax.train import loop, sft
from stat_jax.train.checkpointing import CheckpointManager, abstract_state
from stat_jax.train.metrics import read_metrics
from stat_jax.train.optim import build_optimizer
from tests.train.sft_fixtures import make_student, reverse_examples, write_jsonl

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sft_tiny.py")
PROCESSES, DEVICES_PER_PROCESS, STEPS = 2, 4, 4


def _overrides(student: Path, data: Path, workdir: Path) -> list[tuple[str, str]]:
    # 64 short examples packed into 8-row batches: 2 batches per epoch, so the 4 steps cross an epoch boundary.
    return [("model.path", str(student)), ("data.train_files", str(data)), ("workdir", str(workdir)),
            ("train.steps", str(STEPS)), ("train.checkpoint_every", "2"), ("train.batch_size", "8")]


def _start_process(process_id: int, port: int, overrides, log: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    argv = [sys.executable, "-m", "stat_jax.cli", "sft", f"--config={CONFIG}",
            f"--coordinator-address=127.0.0.1:{port}", f"--num-processes={PROCESSES}", f"--process-id={process_id}",
            *[f"--config.{k}={v}" for k, v in overrides]]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _restore(checkpoint_dir: Path, config, student: Path, mesh) -> tuple[dict, dict]:
    """The final training state of a run, restored in this process onto `mesh`."""
    kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat)
    _, abstract_params = nnx.split(abstract_model(ModelConfig.from_hf_dir(student), **kw))
    params_shapes = nnx.to_pure_dict(abstract_params)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
    tx, _ = build_optimizer(config.train, STEPS)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shapes,
              "opt_state": jax.eval_shape(tx.init, params_shapes)}
    with CheckpointManager(checkpoint_dir, save_every=1, async_save=False) as ckpt:
        assert ckpt.all_steps() == [2, 4]
        return ckpt.restore(abstract_state(shapes, loop.state_shardings_for(params_shapes, param_sh, tx, mesh)))


def test_two_process_sft_equals_single_process_and_its_checkpoint_restores_here(tmp_path):
    student = make_student(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_examples(64, seed=3))
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    port = portpicker.pick_unused_port()
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    procs = [_start_process(i, port, _overrides(student, data, multi_dir), logs[i]) for i in range(PROCESSES)]
    try:
        # The reference: this process alone, 8 devices, the same config and therefore the same global batches.
        config = build_config(CONFIG, _overrides(student, data, single_dir))
        single = sft.train_sft(config)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * PROCESSES, "\n\n".join(f"{log}:\n{log.read_text()[-3000:]}" for log in logs)
    assert jax.device_count() == PROCESSES * DEVICES_PER_PROCESS
    assert "process 1 of 2: 4 local / 8 global devices" in logs[1].read_text()

    # Same losses step by step; metrics written once (by process 0), not once per process.
    multi_metrics, single_metrics = read_metrics(multi_dir / "metrics.jsonl"), read_metrics(single_dir / "metrics.jsonl")
    assert [m["step"] for m in multi_metrics] == list(range(1, STEPS + 1))
    for key in ("loss", "loss_tokens", "tokens", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in multi_metrics], [m[key] for m in single_metrics], rtol=1e-5,
                                   err_msg=key)
    result = json.loads((multi_dir / "sft_result.json").read_text())
    assert result["steps"] == STEPS and not result["preempted"]
    np.testing.assert_allclose(result["final_loss"], single["final_loss"], rtol=1e-5)

    # The multi-process checkpoint restores here, onto a different mesh, and matches the reference state.
    other_mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    multi_state, multi_meta = _restore(multi_dir / "checkpoints", config, student, other_mesh)
    single_state, single_meta = _restore(single_dir / "checkpoints", config, student, sharding.make_mesh())
    assert int(multi_state["step"]) == STEPS and multi_meta["data"] == single_meta["data"]
    flat_multi, flat_single = jax.tree.leaves_with_path(multi_state), jax.tree.leaves(single_state)
    assert len(flat_multi) == len(flat_single)
    for (path, a), b in zip(flat_multi, flat_single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # ... and it is not the untouched initial model (training moved the weights).
    initial = load_file(student / "model.safetensors")
    exported_multi = load_file(multi_dir / "hf" / "model.safetensors")
    exported_single = load_file(single_dir / "hf" / "model.safetensors")
    assert exported_multi.keys() == exported_single.keys() == initial.keys()
    moved = 0.0
    for name in initial:
        np.testing.assert_allclose(exported_multi[name], exported_single[name], rtol=1e-4, atol=1e-6, err_msg=name)
        moved = max(moved, float(np.abs(exported_multi[name] - initial[name]).max()))
    assert moved > 1e-3


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """A pod preemption: SIGTERM reaches one host; jax's preemption sync point makes every process checkpoint
    the same step and exit with the trainer's 'preempted' status, so `--resume` can continue the run."""
    student = make_student(tmp_path / "student")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_examples(64, seed=3))
    workdir = tmp_path / "run"
    overrides = _overrides(student, data, workdir)
    overrides += [("train.steps", "100000"), ("train.checkpoint_every", "100000")]
    port = portpicker.pick_unused_port()
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    procs = [_start_process(i, port, overrides, logs[i]) for i in range(PROCESSES)]
    try:
        deadline = time.monotonic() + 150
        while not (workdir / "metrics.jsonl").exists() or len(read_metrics(workdir / "metrics.jsonl")) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [loop.PREEMPTED_STATUS] * PROCESSES, "\n\n".join(log.read_text()[-3000:] for log in logs)
    stops = [re.findall(r"stopped by SIGTERM at step (\d+)", log.read_text()) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    with CheckpointManager(workdir / "checkpoints", save_every=1) as ckpt:
        assert ckpt.latest_step() == int(stops[0][0]) < 100000
