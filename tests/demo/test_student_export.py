"""The shipped base student: `stat-jax demo --config.demo.export_student=True` rebuilds it (to float32 rounding), and
the demo uses a shipped student only when it was built from the current settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from stat_jax.config import load_config_file
from stat_jax.demo import run

REPO = Path(__file__).resolve().parents[2]
# A small build (the real one pre-trains 2,000 steps of the default architecture).
SMALL = ["--config.demo.pretrain_steps=12", "--config.demo.hidden_size=32", "--config.demo.num_heads=2",
         "--config.demo.train_size=400", "--config.demo.heldout_size=20", "--config.demo.test_size=20"]


def _export(tmp_path: Path, name: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / f"student-{name}"
    proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", "demo", "--quick", *SMALL,
                           "--config.demo.export_student=True", f"--config.demo.student_dir={out}",
                           f"--config.workdir={tmp_path / f'work-{name}'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"export failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "build.json").read_text())


def test_export_is_deterministic_and_the_demo_uses_only_a_matching_build(tmp_path):
    a, b = _export(tmp_path, "a"), _export(tmp_path, "b")
    assert a["settings"] == b["settings"]
    # Same weights up to float32 rounding: XLA CPU's threaded reductions are not bitwise reproducible (two
    # builds differ by ~1e-8 after 12 steps), so the weights are compared by value, not by file hash.
    from safetensors.numpy import load_file

    wa, wb = (load_file(Path(r["model"]) / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5
    assert (Path(a["model"]) / "config.json").exists() and (Path(a["model"]) / "tokenizer_config.json").exists()
    assert a["settings"]["steps"] == 12 and a["settings"]["arch"][0] == 32

    def demo(**overrides):
        c = load_config_file("configs/demo.py:quick")
        c.workdir = str(tmp_path / "check")
        c.demo.pretrain_steps, c.demo.hidden_size, c.demo.num_heads = 12, 32, 2
        c.demo.student_dir = a["model"]
        for k, v in overrides.items():
            c.demo[k] = v
        return run.Demo(c)

    assert demo().shipped_student() == Path(a["model"])
    assert demo(pretrain_lr=1e-3).shipped_student() is None  # built from other settings: pre-train instead
    assert demo(rare_weight=0.5).shipped_student() is None
    assert demo(use_shipped_student=False).shipped_student() is None
