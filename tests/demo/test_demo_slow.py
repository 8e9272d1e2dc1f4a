"""`stat-jax demo` (the default run, ~10 minutes on 2 cores) shows the method working: issue 15's goals 1-4.

Slow: run by `make test-slow`. The run uses the shipped base student (stat_jax/demo/student)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The module's first test waits for the whole demo (its setup): the suite-wide 900 s stopped it on a loaded machine.
pytestmark = pytest.mark.timeout(2400)


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


def _values(results, row, key="overall"):
    return results["rows"][row][key]["values"]


def _mean(results, row, key="overall"):
    return results["rows"][row][key]["mean"]


# Measured 2026-12-01, the default run (3 seeds, 600 test questions): base 57.8, SFT 58.2 +- 2.4 (saturated: +0.4),
# MATH-Hard 57.6, Embed-Sel 57.2, STAT-Sel 57.4 (flagged +0.8 over SFT), STAT-Syn 56.8 (flagged +0.7), GRPO on top
# -0.4 (SFT), -0.8 (STAT-Sel), +0.5 (STAT-Syn). Goals 2 and 4, and STAT-Sel above MATH-Hard, are not met yet: these
# tests say so (xfail, not strict) until a run meets them.
# 2026-12-02, held-out split, seed 0 only (choosing settings): base 61.0, SFT 59.0, MATH-Hard 58.3, Embed-Sel 57.0,
# STAT-Sel 55.0 with the teacher's slipping answers and 60.3 with the dataset solutions (now the default), STAT-Syn
# 58.8; SFT +GRPO 61.5, STAT-Sel(teacher) +GRPO 56.8; finetune_lr 1e-3: SFT 57.0, STAT-Sel 56.0. The rare skills
# barely move under any of these: the default run on the test split was not re-measured with them.
# With demo.skill_map_size 10,000 (now the default; held-out, seeds 0 and 1, sft and stat_sel only): SFT 59.0/57.8,
# STAT-Sel 62.7/63.2 (+4.6 overall, +8.5 on the flagged skills): goal 2 for STAT-Sel on held-out, not yet on test.
# Seed 0 of the other rows there: MATH-Hard 63.0 (above STAT-Sel: the pool's extra 3-step questions lift it too),
# Embed-Sel 61.5, STAT-Syn 59.5.
# 2026-12-02, the default run on the test split, 3 seeds (10 min 17 s on the idle 2 cores, with the compilation
# cache): base 57.8, SFT 58.2 (+0.4: saturated), MATH-Hard 59.3, Embed-Sel 58.4, STAT-Sel 59.1 (+0.9 overall, +1.2
# flagged), STAT-Syn 57.4 (flagged +2.1); GRPO on top -0.4 (SFT), -1.2 (STAT-Sel), -1.1 (STAT-Syn); STAT-Sel round 2
# 59.9 (+0.8 over round 1, +3.0 on round 1's flagged skills).
# 2026-12-03, demo.grpo_lr 3e-5 (chosen on the held-out split: configs/demo.py), same run otherwise (10 min 58 s in
# a slower hour of the same machine; the previous settings took 10 min 04 s earlier that morning): every row as
# above except GRPO on top +0.1 +- 0.7 (SFT), +0.2 +- 0.2 (STAT-Sel), +0.4 +- 0.7 (STAT-Syn): no longer negative,
# not yet +1.
# 2026-12-03 (session 11), a new task and student (rare: borrow_subtraction, modular_reduction, rounding at
# rare_weight 0.003; the student pre-trained 2,000 steps; finetune_lr 2e-4; all chosen on the held-out split,
# configs/demo.py), the default run on the test split, 3 seeds, 10 min 54 s cold: base 56.2, SFT 58.1 (+1.9:
# saturated), MATH-Hard 58.3, Embed-Sel 56.7, STAT-Sel 59.7 (+1.7 overall, +7.9 flagged), STAT-Syn 60.1 (+2.0,
# +8.2), every STAT seed above every SFT seed; GRPO on top +0.4 (SFT), -0.4 (STAT-Sel), +0.1 (STAT-Syn); round 2
# 59.3. Goal 1 and the baselines' order are met (no xfail); goal 2's +3 overall and goal 4 are not.
# 2026-12-04 (session 13), GRPO on fresh balanced questions (demo.grpo_prompt_source=fresh), oversample 3 (training
# on the groups whose rewards differ), lr 5e-5, rows sized to the prompts (all chosen on the held-out split,
# configs/demo.py), 9 min 40 s: every SFT-side row as above; GRPO on top +0.4 +- 0.4 (SFT), +0.3 +- 0.9 (STAT-Sel),
# +0.6 +- 0.5 (STAT-Syn): positive for every method, not yet +1.
# 2026-12-04 (session 14), finetune_lr 3e-4 and grpo_lr 1e-4 (chosen on the held-out split: configs/demo.py): base
# 56.2, SFT 56.9 (+0.8: saturated), MATH-Hard 58.0, Embed-Sel 56.6, STAT-Sel 58.3 (+1.4 overall, +8.8 flagged),
# STAT-Syn 61.8 (+4.9, +14.9), every STAT seed above every SFT seed; GRPO on top +1.0 (SFT), +1.3 (STAT-Sel),
# +0.2 (STAT-Syn); round 2 60.0. Open: STAT-Sel's +3 overall and GRPO's +1 on STAT-Syn.
OPEN = "issue 15: not met by the last measured default run (see the comment above)"
# Accuracies are counts over 600 questions: a gain of exactly 1 point averages to 0.00999... in floats.
EPS = 1e-9


@pytest.mark.slow
def test_plain_sft_is_saturated(results):
    assert abs(_mean(results, "sft") - _mean(results, "base")) <= 0.02 + EPS, results["verdict"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param("stat_sel", marks=pytest.mark.xfail(reason=OPEN, strict=False)),
                                    "stat_syn"])
def test_stat_beats_plain_sft(results, method):
    assert _mean(results, method) - _mean(results, "sft") >= 0.03 - EPS, results["verdict"]
    assert _mean(results, method, "flagged") - _mean(results, "sft", "flagged") >= 0.08 - EPS, results["verdict"]
    assert min(_values(results, method)) > max(_values(results, "sft")), results["verdict"]
    assert set(results["rare_skills"]) <= set(results["flagged_skills"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["math_hard", "embed_sel"])
def test_baselines_below_stat_sel(results, method):
    assert _mean(results, method) < _mean(results, "stat_sel"), results["verdict"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "stat_sel",
                                    pytest.param("stat_syn", marks=pytest.mark.xfail(reason=OPEN, strict=False))])
def test_grpo_adds_on_top(results, method):
    with_grpo, without = _values(results, f"{method}+grpo"), _values(results, method)
    diffs = [a - b for a, b in zip(with_grpo, without)]
    spread = results["rows"][method]["overall"]["std"]
    assert sum(diffs) / len(diffs) >= 0.01 - EPS, results["verdict"]
    assert min(diffs) >= -spread - EPS, (diffs, spread)


@pytest.mark.slow
def test_round_two_profiles_each_seed_again_and_trains_further(results):
    """Continual STAT (issue 16): a row per seed, each round-2 profile still flagging the skills the task made rare
    (round 1's training moved them only a little), and its set matching the token budget."""
    assert results["rows"]["stat_sel+round2"]["runs"] == len(results["seeds"])
    for seed in results["seeds"]:
        record = results["round2"][f"seed{seed}/stat_sel"]
        assert set(results["rare_skills"]) <= set(record["flagged_skills"]), record["flagged_skills"]
        assert results["token_budget"] <= record["set"]["tokens"] <= 1.01 * results["token_budget"]
