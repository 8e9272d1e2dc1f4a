"""`stat-jax demo --quick` end to end: every stage through the real components, outputs well formed, and a
re-run is a no-op that reproduces the same results."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stat_jax.demo import task

REPO = Path(__file__).resolve().parents[2]


def _demo(workdir: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    # One CPU device, as on a user's machine (the suite's conftest asks for 8 fake ones).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", "demo", "--quick", f"--config.workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc, time.monotonic() - start


def test_demo_quick_end_to_end_and_rerun_is_a_noop(tmp_path):
    workdir = tmp_path / "demo"
    first, seconds = _demo(workdir)
    assert seconds < 240, f"--quick took {seconds:.0f}s; it must stay under 3 minutes on 2 cores"

    results = json.loads((workdir / "results.json").read_text())
    assert "grpo_skipped" not in results
    methods = ["base", "sft", "sft+grpo", "stat_sel", "stat_sel+grpo", "stat_syn", "stat_syn+grpo"]
    assert list(results["rows"]) == methods
    assert results["seeds"] == [0, 1]
    for name, row in results["rows"].items():
        assert row["runs"] == (1 if name == "base" else 2)
        assert 0.0 <= row["overall"]["mean"] <= 1.0 and len(row["overall"]["values"]) == row["runs"]
        assert set(row["per_skill"]) <= set(task.SKILL_NAMES)
    assert results["profile"]["num_questions"] > 0 and results["profile"]["skills"]
    assert set(results["flagged_skills"]) <= set(task.SKILL_NAMES)
    # Equal budget: every method's training set holds the same number of tokens (to within one example).
    assert results["sets"] and all(v["examples"] > 0 for v in results["sets"].values())
    for png in ("per_skill_accuracy.png", "stat/profile/profile.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "STAT-Sel" in first.stdout and "STAT-Syn" in first.stdout and "SFT (original mix)" in first.stdout
    # The offline teacher went through the shared client: its ledger recorded the calls.
    assert (workdir / "stat/teacher/ledger.jsonl").stat().st_size > 0

    before = (workdir / "results.json").read_bytes()
    second, rerun_seconds = _demo(workdir)
    assert (workdir / "results.json").read_bytes() == before
    assert second.stdout.split("results:")[0] == first.stdout.split("results:")[0]
    assert rerun_seconds < seconds / 2, (rerun_seconds, seconds)  # every step was skipped
