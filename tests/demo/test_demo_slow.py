"""`stat-jax demo` (the default run, ~10 minutes on 2 cores) shows the method working: issue 44's goals 1-4, each
with its 95% paired-bootstrap interval (report/verdict.paired_interval). No goal is marked expected-to-fail: a goal
the default run does not meet fails here (docs/decisions.md has every measured run).

Slow: run by `make test-slow`. The run uses the shipped base student (stat_jax/demo/student)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from stat_jax.report.verdict import paired_interval

REPO = Path(__file__).resolve().parents[2]
# The module's first test waits for the whole demo (its setup): the suite-wide 900 s stopped it on a loaded machine.
pytestmark = pytest.mark.timeout(2400)
EPS = 1e-9  # accuracies are counts over the test questions: a gain of exactly 1 point is 0.00999... in floats


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", "demo", f"--config.workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((workdir / "results.json").read_text())


def _mean(results, row, key="overall"):
    return results["rows"][row][key]["mean"]


def _interval(results, a, b):
    """(mean, low, high) of row a - row b in points, paired over the test questions and seeds."""
    return paired_interval(results["rows"][a]["correct"], results["rows"][b]["correct"])


@pytest.mark.slow
def test_plain_sft_is_saturated(results):
    assert abs(_mean(results, "sft") - _mean(results, "base")) <= 0.02 + EPS, results["verdict"]


@pytest.mark.slow
def test_every_comparison_has_an_interval_no_wider_than_1_5_points(results):
    """Goal 1: the verdict's lines carry their intervals, and the test split is large enough for +-1.5 points."""
    assert results["questions"] == len(results["rows"]["sft"]["correct"][0])
    comparisons = [line for line in results["verdict"] if " - " in line or "GRPO on top" in line]
    assert comparisons and all("[95% CI " in line for line in comparisons), results["verdict"]
    for method in ("stat_sel", "stat_syn"):
        _, low, high = _interval(results, method, "sft")
        assert (high - low) / 2 <= 1.5, (method, low, high, results["questions"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stat_sel", "stat_syn"])
def test_stat_beats_plain_sft_beyond_noise(results, method):
    """Goal 2: >= +3 points overall with the interval's lower end above 0, >= +8 on the flagged skills."""
    mean, low, _ = _interval(results, method, "sft")
    assert mean >= 3 - EPS and low > 0, (mean, low, results["verdict"])
    assert _mean(results, method, "flagged") - _mean(results, "sft", "flagged") >= 0.08 - EPS, results["verdict"]
    assert set(results["rare_skills"]) <= set(results["flagged_skills"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["math_hard", "embed_sel"])
def test_baselines_below_stat_sel(results, method):
    assert _mean(results, method) < _mean(results, "stat_sel"), results["verdict"]


def _slope(values):
    xs = range(len(values))
    mx, my = statistics.fmean(xs), statistics.fmean(values)
    return sum((x - mx) * (y - my) for x, y in zip(xs, values)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "stat_sel", "stat_syn"])
def test_grpo_adds_on_top_and_its_reward_rises(results, method):
    """Goal 3: GRPO adds >= +1 point with the interval's lower end above 0, and every run's reward rises."""
    mean, low, _ = _interval(results, f"{method}+grpo", method)
    assert mean >= 1 - EPS and low > 0, (mean, low, results["verdict"])
    for seed in results["seeds"]:
        rewards = [r["reward_mean"] for r in results["grpo_curves"][f"seed{seed}/{method}"]]
        assert _slope(rewards) > 0, (seed, rewards)


@pytest.mark.slow
def test_skill_targeted_grpo_beats_the_balanced_prompts_on_flagged_skills(results):
    """Goal 4: GRPO prompts drawn by the Missing-Skill-Profile lift the flagged skills more than balanced ones."""
    targeted, balanced = "stat_sel+grpo_targeted", "stat_sel+grpo"
    assert _mean(results, targeted, "flagged") > _mean(results, balanced, "flagged"), results["verdict"]


@pytest.mark.slow
def test_round_two_profiles_each_seed_again_and_trains_further(results):
    """Continual STAT (issue 16): a row per seed, each round-2 profile still flagging the skills the task made rare
    (round 1's training moved them only a little), and its set matching the token budget."""
    assert results["rows"]["stat_sel+round2"]["runs"] == len(results["seeds"])
    for seed in results["seeds"]:
        record = results["round2"][f"seed{seed}/stat_sel"]
        assert set(results["rare_skills"]) <= set(record["flagged_skills"]), record["flagged_skills"]
        assert results["token_budget"] <= record["set"]["tokens"] <= 1.01 * results["token_budget"]
