"""Cost before spend (issue 16, item 4): `stat-jax run --dry-run` plans every teacher stage's calls, tokens and
price from the real prompts on the run's own rows, refuses a plan over teacher.max_calls, and asks nothing."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from stat_jax import cli
from stat_jax.errors import BudgetFailure
from stat_jax.stat import pipeline
from stat_jax.stat import plan
from stat_jax.teacher import prompts
from stat_jax.teacher.gemini import GeminiTeacher
from tests.teacher.fake_gemini import FakeGemini

KEY = "test-key-123"
SUBJECTS = ("Algebra", "Geometry")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(i: int, split: str) -> dict:
    # Fixed-width numbers: every question's prompt has the same length, so totals scale exactly with the rows.
    return {"problem": f"What is {i:04d} + 1?", "solution": f"It is \\boxed{{{i + 1:04d}}}.",
            "type": SUBJECTS[i % 2], "level": "Level 3", "unique_id": f"{split}/{i:04d}.json"}


def _overrides(tmp_path, train_rows: int, **extra) -> list[str]:
    values = {
        "workdir": tmp_path / "never",  # a dry run writes nothing
        "stat.train_benchmark": "math_train",
        "stat.train_source": _write(tmp_path / f"train{train_rows}.jsonl",
                                    [_row(i, "train") for i in range(train_rows)]),
        "stat.heldout_benchmark": "math",
        "stat.heldout_source": _write(tmp_path / "heldout.jsonl", [_row(5000 + i, "test") for i in range(6)]),
        "stat.heldout_size": 0, "stat.heldout_exclude": "", "stat.skills_sample_per_subject": 0,
        "stat.num_hard": 4, "stat.sel_target_size": 0, **extra}
    return [f"--config.{k}={v}" for k, v in values.items()]


def dry_run(capsys, tmp_path, train_rows: int, **extra) -> dict:
    assert cli.main(["run", "--config=configs/base.py", "--dry-run", *_overrides(tmp_path, train_rows, **extra)]) == 0
    out, err = capsys.readouterr()
    assert "teacher plan (gemini-2.5-flash" in err  # the table, on stderr; stdout stays one JSON document
    return json.loads(out)["teacher_plan"]


def by_task(summary: dict) -> dict[tuple[str, str], dict]:
    return {(r["stage"], r["task"]): r for r in summary["stages"]}


def test_plan_follows_from_the_prompts_and_doubles_with_the_rows(tmp_path, capsys):
    small = dry_run(capsys, tmp_path, 10)
    rows = by_task(small)
    assert set(rows) == {("skills", "propose_skills"), ("skills", "merge_skills"), ("label", "label_skills"),
                         ("diagnose", "diagnose"), ("sel", "solve")}
    assert rows["label", "label_skills"]["calls"] == 10 and rows["skills", "propose_skills"]["calls"] == 10
    assert rows["skills", "merge_skills"]["calls"] == len(SUBJECTS)
    assert rows["diagnose", "diagnose"]["calls"] == 4  # stat.num_hard
    # 4 hard x 3 skills x 5 questions x 3 teacher answers (the paper's STAT-Sel, the default) = 180 calls.
    assert rows["sel", "solve"]["calls"] == 180
    # The skills stage names skills for every training question by default, and prices a per-subject sample too.
    assert rows["skills", "propose_skills"]["note"].startswith("every training question (the paper); "
                                                               "stat.skills_sample_per_subject=200: 10 calls, $")
    # One label prompt, by hand: the real prompt builder on the first row with a 25-skill placeholder catalog.
    prompt = prompts.label_skills("What is 0000 + 1?", "It is \\boxed{0001}.", "Algebra",
                                  plan._placeholder_catalog(25), max_skills=3).prompt
    label = rows["label", "label_skills"]
    assert label["input_tokens"] == 10 * math.ceil(len(prompt) / plan.CHARS_PER_TOKEN)
    assert label["output_tokens"] == 10 * 512  # teacher.max_output_tokens_by_task.label_skills
    assert label["cost_usd"] == pytest.approx((label["input_tokens"] * 0.30 + label["output_tokens"] * 2.50) / 1e6)
    assert small["total"]["calls"] == sum(r["calls"] for r in small["stages"])

    big = by_task(dry_run(capsys, tmp_path, 20))
    for key in (("label", "label_skills"), ("skills", "propose_skills")):
        assert big[key]["calls"] == 2 * rows[key]["calls"]
        assert big[key]["input_tokens"] == 2 * rows[key]["input_tokens"]
        assert big[key]["cost_usd"] == pytest.approx(2 * rows[key]["cost_usd"])
    assert big["diagnose", "diagnose"] == rows["diagnose", "diagnose"]  # the held-out side did not change


def test_a_sampled_catalog_is_priced_beside_the_whole_training_set(tmp_path, capsys):
    every = by_task(dry_run(capsys, tmp_path, 10))["skills", "propose_skills"]
    sampled = by_task(dry_run(capsys, tmp_path, 10, **{"stat.skills_sample_per_subject": 2}))["skills", "propose_skills"]
    assert sampled["calls"] == 2 * len(SUBJECTS)
    # Each row prices the other choice: the sample's note is the whole set's row, and the other way round.
    assert sampled["note"] == (f"2 questions per subject (a sample); stat.skills_sample_per_subject=0: "
                               f"{every['calls']} calls, ${every['cost_usd']:.2f}")


def test_sel_answers_are_capped_by_the_target_and_syn_counts_its_solutions(tmp_path, capsys):
    rows = by_task(dry_run(capsys, tmp_path, 10, **{"stat.sel_target_size": 30, "stat.sel_answer_source": "teacher",
                                                     "stat.stages": "data,skills,label,rollout,hard,diagnose,sel,syn"}))
    assert rows["sel", "solve"]["calls"] == 30
    assert rows["syn", "synthesize"]["calls"] == 12  # 4 hard x 3 skills
    assert rows["syn", "solve"]["calls"] == 12 * 2 * 3  # 2 new questions x 3 solutions each


def test_a_plan_over_the_call_cap_is_refused_and_no_teacher_is_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGemini(lambda body: {}, api_key=KEY) as fake:
        args = _overrides(tmp_path, 10, **{"teacher.max_calls": 50, "teacher.base_url": fake.base_url})
        config = cli.build_config("configs/base.py", [tuple(a.removeprefix("--config.").split("=", 1)) for a in args])
        with pytest.raises(BudgetFailure, match=r"plans 2\d\d teacher calls, more than teacher.max_calls=50"):
            pipeline.main(config, argparse.Namespace(dry_run=True, only=None, resume=False))
        assert "total" in capsys.readouterr().err  # the plan was shown before the refusal
        dry_run(capsys, tmp_path, 10, **{"teacher.base_url": fake.base_url})  # under the default cap: fine
        assert fake.requests == []  # nothing was asked
    assert not (tmp_path / "never").exists()  # no ledger, no cache, no run directory


@pytest.mark.parametrize("method", ["sel", "syn"])
def test_the_paper_run_on_the_real_math_files_fits_the_default_cap(method, tmp_path, capsys):
    from tests.data.test_real_data import DATA

    if not DATA.is_dir():
        pytest.skip(f"real benchmark files not found at {DATA}")
    argv = ["run", f"--config=configs/stat_{method}_llama3_2_1b.py", "--dry-run", f"--config.workdir={tmp_path / 'no'}",
            f"--config.stat.train_source={DATA / 'math_train.jsonl'}",
            f"--config.stat.heldout_source={DATA / 'math_test.jsonl'}"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)["teacher_plan"]
    rows = by_task(summary)
    # PAPER.md: skills named for every MATH train question (7,498 well-formed rows) and merged per subject (7),
    # every question labelled, 500 hard; the note prices a 200-per-subject sample (1,400 calls) beside it.
    propose = rows["skills", "propose_skills"]
    assert propose["calls"] == 7498 and rows["skills", "merge_skills"]["calls"] == 7
    assert "stat.skills_sample_per_subject=200: 1400 calls" in propose["note"]
    assert rows["label", "label_skills"]["calls"] == 7498 and rows["diagnose", "diagnose"]["calls"] == 500
    if method == "sel":
        assert rows["sel", "solve"]["calls"] == 9500  # 9.5k pairs, 3 teacher answers per question
    else:
        assert rows["syn", "synthesize"]["calls"] == 1500 and rows["syn", "solve"]["calls"] == 1500 * 2 * 3
    assert summary["rows"] == {"train": 7498, "heldout": 1000}
    assert summary["total"]["calls"] < summary["max_calls"] == 36000


def test_gemini_gets_each_tasks_output_cap_and_thinking_budget():
    with FakeGemini(lambda body: {"solution": "\\boxed{2}", "answer": "2"}, api_key=KEY) as fake:
        backend = GeminiTeacher("gemini-test", api_key=KEY, base_url=fake.base_url, max_output_tokens=777,
                                max_output_tokens_by_task={"solve": 4096}, thinking_budget_by_task={"solve": 1024})
        backend.complete(prompts.solve("1+1?"))
        backend.complete(prompts.label_skills("1+1?", None, "Algebra", [{"name": "add", "description": "d"}]))
    solve, label = (r["body"]["generationConfig"] for r in fake.requests)
    # google-genai sends the budget as thinking_budget in this release (the API takes either spelling).
    assert solve["maxOutputTokens"] == 4096 and solve["thinkingConfig"] in ({"thinkingBudget": 1024},
                                                                            {"thinking_budget": 1024})
    assert label["maxOutputTokens"] == 777 and "thinkingConfig" not in label  # not configured: the model's default
    other = GeminiTeacher("gemini-test", api_key=KEY, max_output_tokens_by_task={"solve": 2048})
    assert other.backend_id != backend.backend_id  # other limits, other answers: other cache keys
