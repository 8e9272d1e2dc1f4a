"""`stat-jax report` (issue 43) on a run directory built here: sections appear only for the stages that ran,
question and answer text is escaped, several runs are compared side by side, and the page renders in headless
Chromium (the quick demo's report: tests/demo/test_demo_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

from stat_jax import cli
from stat_jax.report import write_report
from stat_jax.stat import io


def make_run(root: Path, *, question: str = "What is 2+2?", with_grpo: bool = False,
             counts: tuple[int, int] = (3, 1)) -> Path:
    """A `stat-jax run` workdir with the files its stages write: profile, hard questions, diagnoses, sets, ledger."""
    run = root / "stat"
    io.write_json(run / "profile/profile.json", {"skills": [
        {"skill": "algebra:factoring", "count": counts[0], "frequency": counts[0] / sum(counts)},
        {"skill": "algebra:fractions", "count": counts[1], "frequency": counts[1] / sum(counts)}]})
    io.write_jsonl(run / "hard/hard.jsonl", [
        {"id": "q1", "problem": question, "answer": "4", "response": "It is <b>5</b> \\boxed{5}", "rule": "consistency",
         "score": 0.2},
        {"id": "q2", "problem": "Factor x^2-1", "answer": "(x-1)(x+1)", "response": "x^2-1", "rule": "consistency",
         "score": 0.0}])
    io.write_json(run / "hard/manifest.json", {"stats": {"rule": "consistency: fewer than 2 agree",
                                                         "uses_reference_labels": False}})
    io.write_jsonl(run / "diagnose/diagnoses.jsonl", [
        {"id": "q1", "missing_skills": ["algebra:fractions"], "explanation": "added wrong"},
        {"id": "q2", "missing_skills": ["algebra:factoring", "algebra:fractions"], "explanation": "no factoring"}])
    io.write_jsonl(run / "label/skill_map.jsonl", [{"id": "t1", "skills": ["algebra:factoring"]},
                                                   {"id": "t2", "skills": ["algebra:fractions"]}])
    io.write_jsonl(run / "sel/stat_sel.jsonl", [{"prompt": "p", "response": "r",
                                                 "meta": {"skill": "algebra:factoring"}}])
    totals = {"calls": 7, "failed_calls": 0, "input_tokens": 900, "output_tokens": 300, "cost_usd": 0.001}
    io.write_json(run / "teacher/summary.json", {"backend": "gemini-2.5-flash", "cache_hits": 2, "session": totals,
                                                 "run_total": totals})
    io.write_json(run / "eval/summary.json", {"benchmarks": {"math500": {"n": 2, "pass@1": 0.5, "headline": 0.5}}})
    if with_grpo:
        io.write_jsonl(run / "grpo/metrics.jsonl", [{"step": i, "reward_mean": 0.3 + 0.1 * i} for i in range(1, 4)])
    (root / "config.json").write_text(json.dumps({"seed": 0, "stat": {"method": "sel"}}))
    (root / "command.json").write_text(json.dumps({"command": "stat-jax run --config=configs/base.py"}))
    return root


def test_question_text_is_escaped_and_a_missing_stage_leaves_its_section_out(tmp_path):
    run = make_run(tmp_path / "a", question="<script>alert('x')</script> 2+2?")
    html = write_report([run]).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "It is &lt;b&gt;5&lt;/b&gt;" in html  # the student's answer too
    for section in ("verdict", "profile", "shares", "hard", "ledger", "config"):
        assert f'id="{section}"' in html, section
    assert 'id="grpo"' not in html and 'id="per-skill"' not in html  # no GRPO stage, no demo per-skill table
    assert html.count('class="hard"') == 2 and 'data-skills="factoring fractions"' in html
    assert "stat-jax run --config=configs/base.py" in html and "<svg" in html and "http" not in html.split("<svg")[0]


def test_grpo_curves_and_several_runs_side_by_side(tmp_path, capsys):
    first = make_run(tmp_path / "round1", with_grpo=True)
    second = make_run(tmp_path / "round2", counts=(1, 3))
    assert cli.main(["report", str(first), str(second)]) == 0
    printed = json.loads(capsys.readouterr().out)
    html = Path(printed["report"]).read_text()
    assert printed["report"] == str(first / "report.html") and printed["bytes"] == len(html.encode())
    assert 'id="grpo"' in html and "GRPO: mean reward" in html
    assert 'id="comparison"' in html and "<th scope=\"col\">round1</th><th scope=\"col\">round2</th>" in html
    assert "<td>75.0</td><td>25.0</td>" in html  # algebra:factoring's share in each run's profile


def test_report_of_a_directory_that_is_not_there_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 9
    assert capsys.readouterr().err.strip().startswith("stat-jax report: report: ")
