"""The label-free hard rule (issue 16, item 2): agreement among the student's own samples, by the grader's
equivalence, on constructed samples worked out by hand; which rule chose each question is recorded."""

from __future__ import annotations

import logging

import pytest

from stat_jax.config import load_config_file
from stat_jax.data.records import MathProblem
from stat_jax.errors import ConfigError
from stat_jax.stat import hard, io
from stat_jax.stat.pipeline import StageContext, run_pipeline, stage_hard

# Five samples per question; the answer column says what a hand count of agreeing final answers gives.
SAMPLES = {
    # 1/2 and 0.5 agree only by math-verify's equivalence (string equality would find no agreement): 2 of 5.
    "halves": ["so \\boxed{\\frac{1}{2}}", "it is \\boxed{0.5}", "\\boxed{3}", "\\boxed{4}", "I give up"],
    "all_differ": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "no box here: 4", "\\boxed{5}"],
    "unanimous": ["\\boxed{7}"] * 5,
    "no_answers": ["I think it is 9", "maybe 9", "", "nine", "9?"],
    "three_of_five": ["\\boxed{x^2+1}", "\\boxed{1+x^2}", "\\boxed{2}", "\\boxed{x^2 + 1}", "\\boxed{3}"],
}
AGREEMENT = {"halves": 2, "all_differ": 1, "unanimous": 5, "no_answers": 0, "three_of_five": 3}
HARD = {"all_differ", "no_answers"}  # fewer than 2 of 5 agree: the paper's rule


def _problems():
    return [MathProblem(id=k, problem=f"question {k}", answer="reference-unused") for k in SAMPLES]


def test_consistency_counts_agreement_by_equivalence_by_hand():
    scorer = hard.ConsistencyScorer(min_agree=2, workers=0)
    scores = scorer.score(_problems(), list(SAMPLES.values()))
    assert dict(zip(SAMPLES, scorer.agreement)) == AGREEMENT
    assert {k for k, flag in zip(SAMPLES, scorer.hard_flags()) if flag} == HARD
    # A response scores 1 when it is in the largest agreeing group: the mean is the share that agrees.
    assert scores[0] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert scores[4] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert scores[3] == [0.0] * 5
    assert scorer.final_answers[0][:2] == ["\\frac{1}{2}", "0.5"] and scorer.final_answers[3] == [None] * 5
    # A stricter threshold: 3 of 5 must agree, so "halves" becomes hard too.
    strict = hard.ConsistencyScorer(min_agree=3, workers=0)
    strict.score(_problems(), list(SAMPLES.values()))
    assert {k for k, flag in zip(SAMPLES, strict.hard_flags()) if flag} == HARD | {"halves"}


def test_consistency_in_the_grader_pool_agrees_with_in_process():
    pooled = hard.ConsistencyScorer(min_agree=2, workers=1)
    pooled.score(_problems(), list(SAMPLES.values()))
    assert dict(zip(SAMPLES, pooled.agreement)) == AGREEMENT


def test_select_hard_follows_the_rule_and_records_it():
    scorer = hard.ConsistencyScorer(min_agree=2, workers=0)
    problems, responses = _problems(), list(SAMPLES.values())
    scores = scorer.score(problems, responses)
    # threshold=1.0 would also admit "halves" and "three_of_five" (mean < 1); the flags decide instead.
    rows = hard.select_hard(problems, responses, scores, num_hard=10, seed=0, hard=scorer.hard_flags(),
                            rule=scorer.name)
    assert [r["id"] for r in rows] == ["no_answers", "all_differ"]  # least agreement first (0/5, then 1/5)
    assert [r["score"] for r in rows] == [0.0, pytest.approx(0.2)]
    assert all(r["rule"] == "consistency" for r in rows)
    assert hard.select_hard(problems, responses, scores, num_hard=1, seed=0, hard=scorer.hard_flags(),
                            rule="consistency")[0]["id"] == "no_answers"


def _run_dir(tmp_path):
    run_dir = tmp_path / "stat"
    io.write_jsonl(run_dir / "data/heldout.jsonl", [p.to_dict() for p in _problems()])
    io.write_jsonl(run_dir / "rollout/responses.jsonl",
                   [{"id": k, "prompt": f"question {k}", "responses": rs, "finish_reasons": ["stop"] * 5}
                    for k, rs in SAMPLES.items()])
    return run_dir


def _config(**stat):
    c = load_config_file("configs/base.py")
    c.stat.grade_workers = 0
    for k, v in stat.items():
        c.stat[k] = v
    return c


def test_hard_stage_defaults_to_consistency_and_writes_rule_and_score(tmp_path, caplog):
    run_dir = _run_dir(tmp_path)
    config = _config()
    assert (config.stat.scorer, config.stat.rollout_samples) == ("auto", 5)  # label-free, enough samples
    with caplog.at_level(logging.INFO, logger="stat_jax.stat.pipeline"):
        stats = stage_hard(StageContext(config, run_dir))
    assert "label-free" in caplog.text and "consistency" in caplog.text
    assert stats["scorer"] == "consistency" and stats["uses_reference_labels"] is False
    assert stats["flagged_by_rule"] == 2 and stats["hard"] == 2
    rows = io.read_jsonl(run_dir / "hard/hard.jsonl")
    assert [(r["id"], r["rule"], r["agreement"]) for r in rows] == [("no_answers", "consistency", 0),
                                                                    ("all_differ", "consistency", 1)]
    scored = {r["id"]: r for r in io.read_jsonl(run_dir / "hard/scores.jsonl")}
    assert {k for k, r in scored.items() if r["hard"]} == HARD
    assert scored["halves"]["score"] == pytest.approx(0.4) and scored["halves"]["rule"] == "consistency"


def test_accuracy_is_an_option_that_says_it_uses_labels(tmp_path, caplog):
    run_dir = _run_dir(tmp_path)
    with caplog.at_level(logging.INFO, logger="stat_jax.stat.pipeline"):
        stats = stage_hard(StageContext(_config(scorer="accuracy"), run_dir))
    assert "uses the reference answers" in caplog.text
    assert stats["scorer"] == "accuracy" and stats["uses_reference_labels"] is True
    rows = io.read_jsonl(run_dir / "hard/hard.jsonl")  # every answer is wrong against "reference-unused"
    assert len(rows) == len(SAMPLES) and {r["rule"] for r in rows} == {"accuracy"}


def test_accuracy_grades_by_the_heldout_benchmarks_headline_rule_and_records_it(tmp_path):
    """GSM8K-style answers in plain text: wrong by the strict rule, right by lm-eval's (GSM8K's headline)."""
    run_dir = tmp_path / "stat"
    problems = [MathProblem(id=f"q{i}", problem=f"question {i}", answer=str(i)) for i in range(3)]
    io.write_jsonl(run_dir / "data/heldout.jsonl", [p.to_dict() for p in problems])
    answers = {"q0": ["So the answer is 0."] * 2, "q1": ["I get 7."] * 2, "q2": ["\\boxed{2}"] * 2}
    io.write_jsonl(run_dir / "rollout/responses.jsonl",
                   [{"id": k, "prompt": k, "responses": rs, "finish_reasons": ["stop"] * 2} for k, rs in answers.items()])

    def hard_ids(heldout_benchmark="gsm8k"):
        config = _config(scorer="accuracy", rollout_samples=2, heldout_benchmark=heldout_benchmark)
        stats = stage_hard(StageContext(config, run_dir))
        return stats, [r["id"] for r in io.read_jsonl(run_dir / "hard/hard.jsonl")]

    stats, ids = hard_ids()  # configs/base.py: eval.headline.gsm8k = flexible
    assert ids == ["q1"] and stats["grading"] == "flexible" and "lm-eval" in stats["grading_rule"]
    stats, ids = hard_ids(heldout_benchmark="math500")  # MATH-style: strict (the last \\boxed{})
    assert sorted(ids) == ["q0", "q1"] and stats["grading"] == "strict" and "boxed" in stats["grading_rule"]


def test_auto_means_the_prm_when_a_prm_path_is_set():
    assert hard.scorer_name(_config().stat) == "consistency"
    assert hard.scorer_name(_config(prm_path="/some/prm").stat) == "prm"
    with pytest.raises(ConfigError, match="stat.scorer='length'"):
        hard.scorer_name(_config(scorer="length").stat)


def test_one_sample_with_consistency_stops_before_any_stage(tmp_path):
    config = _config(rollout_samples=1)
    config.workdir = str(tmp_path / "run")
    config.stat.stages = ("data", "skills", "label", "rollout", "hard")
    with pytest.raises(ConfigError, match="stat.rollout_samples >= 2; got 1") as e:
        run_pipeline(config)
    assert "stat.scorer=accuracy" in e.value.hint
    assert not (tmp_path / "run").exists()  # nothing ran, no teacher was asked
    with pytest.raises(ConfigError, match="consistency_min_agree=6 must be between 2 and stat.rollout_samples=5"):
        hard.check_hard_config(_config(consistency_min_agree=6).stat)
    hard.check_hard_config(_config(rollout_samples=1, scorer="accuracy").stat)  # accuracy works with one sample


def test_a_new_threshold_reruns_the_hard_stage(tmp_path):
    """The stage's manifest notes the fields it read: the consistency threshold among them."""
    from stat_jax.stat.pipeline import STAGES, run_stage

    run_dir = tmp_path / "run"
    io.write_jsonl(run_dir / "data/heldout.jsonl", [{"id": "q0", "problem": "1+1?", "answer": "2"}])
    io.write_jsonl(run_dir / "rollout/responses.jsonl",
                   [{"id": "q0", "prompt": "q0", "responses": ["\\boxed{2}", "\\boxed{3}", "\\boxed{2}"],
                     "finish_reasons": ["stop"] * 3}])
    (stage,) = [s for s in STAGES if s.name == "hard"]
    config = _config(rollout_samples=3)
    assert run_stage(stage, StageContext(config, run_dir)) == "done"
    assert run_stage(stage, StageContext(config, run_dir)) == "skipped"
    assert "stat.consistency_min_agree" in io.read_json(run_dir / "hard/manifest.json")["reads"]
    config.stat.consistency_min_agree = 3
    assert run_stage(stage, StageContext(config, run_dir)) == "done"  # a new threshold re-runs the stage
