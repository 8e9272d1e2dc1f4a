"""`stat-jax demo --quick` end to end: every stage through the real components, outputs well formed, and a
re-run is a no-op that reproduces the same results."""

import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]


def _demo(workdir: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    # One CPU device, as on a user's machine (the suite's conftest asks for 8 fake ones).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", "demo", "--quick", f"--config.workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `stat-jax demo --quick` run: (workdir, its process, seconds)."""
    workdir = tmp_path_factory.mktemp("quick") / "demo"
    first, seconds = _demo(workdir)
    return workdir, first, seconds


@pytest.mark.timeout(2400)  # two demo runs; a loaded shared machine can take several times the idle ~5 minutes
def test_demo_quick_end_to_end_and_rerun_is_a_noop(quick_demo):
    workdir, first, seconds = quick_demo
    assert seconds < 1800, f"--quick took {seconds:.0f}s; it runs in ~5 minutes on 2 idle cores"

    results = json.loads((workdir / "results.json").read_text())
    assert "grpo_skipped" not in results
    methods = ["base", "sft", "math_hard", "embed_sel", "stat_sel", "stat_sel+grpo", "stat_sel+grpo_targeted",
               "stat_syn", "stat_sel+round2"]
    assert sorted(results["rows"]) == sorted(methods)
    assert results["seeds"] == [0, 1]
    for name, row in results["rows"].items():
        assert row["runs"] == (1 if name == "base" else 2)
        assert len(row["overall"]["values"]) == row["runs"]
    # The Missing-Skill-Profile recovers every skill the task made rare ...
    assert set(results["rare_skills"]) <= set(results["flagged_skills"]), results["profile"]["skills"]
    # ... and STAT-Sel's training set exercises the flagged skills at least twice as often as the original mix.
    shares = results["flagged_share"]
    assert shares["stat_sel"] >= 2 * shares["sft"], shares
    # Equal budget: every method's training set holds the same number of tokens, to within 1%.
    tokens = [v["tokens"] for v in results["sets"].values()]
    assert len(tokens) == 2 * 5 and max(tokens) <= 1.01 * min(tokens), results["sets"]
    assert min(tokens) >= results["token_budget"]
    # GRPO learns: on its (repeated) prompts the mean training reward of the later half of the steps beats the
    # earlier half's, in every run. Half-means over 3 steps x 64 rollouts, not the last step against the first:
    # one step's mean of 32 rollouts moved by +-0.09 on its own and a flat run (0.56, 0.47, 0.50, 0.56) failed.
    curves = results["grpo_curves"]
    assert sorted(curves) == ["seed0/stat_sel", "seed0/stat_sel+targeted", "seed1/stat_sel", "seed1/stat_sel+targeted"]
    for name, curve in ((k, v) for k, v in curves.items() if not k.endswith("+targeted")):
        rewards = [r["reward_mean"] for r in curve]
        assert len(rewards) == 6, (name, rewards)
        assert statistics.fmean(rewards[3:]) > statistics.fmean(rewards[:3]), (name, rewards)
    # Skill-targeted GRPO drew its prompts by the profile: each skill the diagnoses name has its share of the
    # prompts (5 per mention, stat.sel_questions_per_skill), and the flagged skills are more frequent in them than
    # in the balanced prompts (read back from the question text, not from the teacher's labels).
    from stat_jax.data import arith_task as task

    def flagged_share(rows):
        return statistics.fmean(any(s in results["flagged_skills"] for s in task.problem_skills(r["problem"]))
                                for r in rows)

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    for seed in (0, 1):
        run = workdir / f"cells/stat_sel+targeted-seed{seed}/stat"
        mentions = Counter(s for d in rows(run / "diagnose/diagnoses.jsonl") for s in d["missing_skills"])
        prompts = rows(run / "grpo/prompts.jsonl")
        labelled = Counter(s for p in prompts for s in p["skills"])
        assert len(prompts) == 5 * sum(mentions.values()) and all(labelled[s] >= 5 * n for s, n in mentions.items())
        assert flagged_share(prompts) > flagged_share(rows(workdir / "data/grpo.jsonl"))
    # Continual STAT: per seed, round 2 profiled round 1's STAT-Sel student (the pipeline's rollout sampled it) on
    # the new validation split, and SFT continued from that student on the new selection, at the same budget.
    round2_ids = [json.loads(line)["id"] for line in (workdir / "data/validation_round2.jsonl").read_text().splitlines()]
    heldout_ids = {json.loads(line)["id"] for line in (workdir / "data/heldout.jsonl").read_text().splitlines()}
    assert round2_ids and not set(round2_ids) & heldout_ids
    for seed in (0, 1):
        run = workdir / f"cells/stat_sel+round2-seed{seed}/stat"
        round1 = json.loads((workdir / f"cells/stat_sel-seed{seed}/stat/sft/done.json").read_text())
        record = results["round2"][f"seed{seed}/stat_sel"]["round"]  # paths relative to the workdir
        assert workdir / record["student"] == Path(round1["model"])
        assert record["previous_run"] == f"cells/stat_sel-seed{seed}/stat"
        rollout = json.loads((run / "rollout/manifest.json").read_text())
        assert rollout["reads"]["model.path"] == round1["model"]
        responses = [json.loads(line)["id"].split("/", 1)[1]
                     for line in (run / "rollout/responses.jsonl").read_text().splitlines()]
        assert sorted(responses) == sorted(round2_ids)
        trainer = json.loads((run / "sft/config.json").read_text())
        assert trainer["model"]["path"] == round1["model"]
        assert json.loads((run / "sft/done.json").read_text())["stage_key"] != round1["stage_key"]
        set_tokens = results["round2"][f"seed{seed}/stat_sel"]["set"]["tokens"]
        assert results["token_budget"] <= set_tokens <= 1.01 * results["token_budget"]
    # Every row is a cell's own pipeline, each of which records the `stat-jax run` command that reproduces it.
    assert len(results["cells"]) == 2 * 5 + 2 + 2  # the methods, round 2 and skill-targeted GRPO, per seed
    # The skill-targeted cell's GRPO starts from the same SFT student as its balanced cell's (same set, same seed).
    def weights(cell):
        model = Path(json.loads((workdir / f"cells/{cell}/stat/sft/done.json").read_text())["model"])
        return [w.read_bytes() for w in sorted(model.glob("*.safetensors"))]

    assert weights("stat_sel+targeted-seed0") == weights("stat_sel-seed0")
    assert all(c["command"].startswith("stat-jax run --config=configs/demo.py:quick ") for c in results["cells"].values())
    for png in ("stat/profile/profile.png",):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("STAT-Sel", "STAT-Syn", "SFT (original mix)", "MATH-Hard", "Embed-Sel", "STAT-Sel - SFT = ",
                  "STAT-Sel round 2", "STAT-Sel round 2 (profiled again", "STAT-Sel +GRPO (skill-targeted prompts)",
                  "[95% CI "):
        assert label in first.stdout
    # The offline teacher went through the shared client: its ledger recorded the calls.
    assert (workdir / "stat/teacher/ledger.jsonl").stat().st_size > 0
    # The profile run's stages were shared: each cell copied them from the stage cache.
    cell = workdir / "cells/sft-seed1/stat"
    assert "restored_from" in json.loads((cell / "rollout/manifest.json").read_text())
    assert (cell / "profile/profile.json").read_bytes() == (workdir / "stat/profile/profile.json").read_bytes()

    assert (workdir / "report.html").stat().st_size > 10_000  # the demo writes its report at its end
    before = (workdir / "results.json").read_bytes()
    second, rerun_seconds = _demo(workdir)
    assert (workdir / "results.json").read_bytes() == before
    assert second.stdout.split("results:")[0] == first.stdout.split("results:")[0]
    assert rerun_seconds < seconds / 2, (rerun_seconds, seconds)  # every step was skipped


def test_a_cells_command_reproduces_its_accuracy_in_a_new_workdir(quick_demo, tmp_path):
    """Issue 40: results.json records each cell's `stat-jax run`; run alone (no stage cache, no shared backend,
    every stage from scratch) in a new workdir it gives the cell's accuracy exactly."""
    import shlex

    workdir = quick_demo[0]
    results = json.loads((workdir / "results.json").read_text())
    cell = results["cells"]["stat_sel-seed1"]
    argv = shlex.split(cell["command"])[1:] + [f"--config.workdir={tmp_path / 'again'}", "--config.stat.stage_cache="]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "stat_jax.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"{cell['command']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    records = [json.loads(line) for line in (tmp_path / "again/stat/eval/demo_test.jsonl").read_text().splitlines()]
    accuracy = sum(bool(r["greedy"]["correct"]) for r in records) / len(records)
    assert accuracy == cell["accuracy"], (accuracy, cell)
    again = tmp_path / "again/stat"
    for f in ("profile/profile.json", "sel/stat_sel.jsonl", "sft/train.jsonl"):
        assert (again / f).read_bytes() == (workdir / "cells/stat_sel-seed1/stat" / f).read_bytes(), f


def test_the_quick_demos_report_in_a_real_browser(quick_demo, tmp_path):
    """The report renders in headless Chromium: every section, one entry per hard question, a skill filter that
    hides the others, and charts that are drawn (non-blank, coloured pixels in the screenshot)."""
    from tests.report_browser import chromium_dom, chromium_screenshot, hard_entries

    workdir = quick_demo[0]
    report = workdir / "report.html"
    dom = chromium_dom(report)
    for section in ("verdict", "per-skill", "profile", "shares", "hard", "grpo", "ledger", "config"):
        assert f'id="{section}"' in dom, section
    hard_rows = (workdir / "stat/hard/hard.jsonl").read_text().splitlines()
    entries = hard_entries(dom)
    assert len(entries) == len(hard_rows) and not any(hidden for _, hidden in entries)
    skill = "rounding"
    wanted = sum(skill in skills.split() for skills, _ in entries)
    filtered = hard_entries(chromium_dom(report, fragment=f"skill={skill}"))
    visible = [skills for skills, hidden in filtered if not hidden]
    assert 0 < len(visible) == wanted < len(entries) and all(skill in s.split() for s in visible)
    image = chromium_screenshot(report, tmp_path / "report.png", width=1280, height=2400)
    coloured = ((image.max(axis=2) - image.min(axis=2)) > 0.25).mean()
    assert coloured > 0.005, f"only {coloured:.2%} coloured pixels: the charts did not render ({tmp_path / 'report.png'})"
    phone = chromium_screenshot(report, tmp_path / "phone.png", width=390, height=1600)
    assert (phone.min(axis=2) < 0.9).mean() > 0.02  # text and charts at phone width, not a blank page
