"""Profiling without leakage on the real MATH files: a seeded 1,000-question validation split of MATH test that
keeps MATH-500 out, `math` evaluated on the other 4,000, and a named error when the held-out set overlaps an
evaluated benchmark."""

from __future__ import annotations

import json

import pytest

from stat_jax.config import load_config_file
from stat_jax.data import math_datasets as md
from stat_jax.data.records import MathProblem
from stat_jax.data.splits import HeldoutOverlapError, question_keys, shared_questions, validation_split
from stat_jax.eval.evaluate import load_eval_data
from stat_jax.stat import io
from stat_jax.stat.pipeline import run_pipeline
from tests.data.test_real_data import DATA

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real benchmark files not found at {DATA}")


@pytest.fixture(scope="module")
def math_test():
    return md.load_benchmark("math", str(DATA / "math_test.jsonl"))


@pytest.fixture(scope="module")
def math500():
    return md.load_benchmark("math500", str(DATA / "math500_test.jsonl"))


def test_same_question_by_unique_id_or_by_text():
    a = MathProblem(id="math/test/algebra/1.json", problem="What is  $1+1$?\n", answer="2")
    by_id = MathProblem(id="math500/test/algebra/1.json", problem="another wording", answer="2")
    by_text = MathProblem(id="mine/q.jsonl:7", problem="What is $1+1$?", answer="2")
    other = MathProblem(id="mine/q.jsonl:8", problem="What is $1+2$?", answer="3")
    assert shared_questions([a], [by_id]) == [a] and shared_questions([a], [by_text]) == [a]
    assert shared_questions([a], [other]) == []
    # Position ids ('file.jsonl:7') name no question across files: only MATH release paths do.
    assert question_keys(by_text) == {"text:What is $1+1$?"}


def test_validation_split_keeps_math500_out_and_is_seeded(math_test, math500):
    heldout, rest = validation_split(math_test, 1000, seed=0, exclude=math500)
    assert (len(heldout), len(rest)) == (1000, 4000)
    assert shared_questions(heldout, math500) == []
    assert len(shared_questions(rest, math500)) == 500  # MATH-500 questions stay in the `math` evaluation
    assert {p.id for p in heldout}.isdisjoint(p.id for p in rest)
    again, _ = validation_split(list(reversed(math_test)), 1000, seed=0, exclude=math500)
    assert {p.id for p in again} == {p.id for p in heldout}  # file order does not matter
    other, _ = validation_split(math_test, 1000, seed=1, exclude=math500)
    assert len({p.id for p in other} & {p.id for p in heldout}) < 400  # ~1000 * 1000/4500 expected by chance
    subjects = {p.subject for p in heldout}
    assert len(subjects) == 7  # a random draw covers every subject
    with pytest.raises(md.DatasetError, match="only 4500 of 5000 are eligible"):
        validation_split(math_test, 4600, seed=0, exclude=math500)


def _config(tmp_path, **stat):
    c = load_config_file("configs/base.py")
    c.workdir = str(tmp_path / "run")
    c.stat.train_benchmark, c.stat.train_source = "math_train", str(DATA / "math_train.jsonl")
    c.stat.heldout_benchmark, c.stat.heldout_source = "math", str(DATA / "math_test.jsonl")
    c.eval.paths.math = str(DATA / "math_test.jsonl")
    c.eval.paths.math500 = str(DATA / "math500_test.jsonl")
    c.eval.paths.gsm8k = str(DATA / "gsm8k_test.jsonl")
    c.eval.benchmarks = ("math", "math500", "gsm8k")
    for k, v in stat.items():
        c.stat[k] = v
    return c


def test_data_stage_on_real_files_splits_counts_bad_rows_and_math_eval_is_the_rest(tmp_path, math500):
    config = _config(tmp_path)
    assert run_pipeline(config, only="data") == {"data": "done"}
    rd = tmp_path / "run" / "stat"
    heldout = [MathProblem.from_dict(r) for r in io.read_jsonl(rd / "data/heldout.jsonl")]
    assert len(heldout) == 1000 and shared_questions(heldout, math500) == []
    stats = io.read_json(rd / "data/manifest.json")["stats"]
    assert stats["heldout"] == 1000 and stats["heldout_source"] == 5000
    assert stats["heldout_kept_out"] == {"math500": 500}
    # The released MATH train set's two empty-\boxed rows are skipped and reported, not a stopped run.
    assert stats["bad_rows"]["train"]["bad_rows"] == 2
    assert [m.split(":", 2)[1] for m in stats["bad_rows"]["train"]["bad_row_examples"]] == ["5530", "5532"]
    # MATH train holds one problem whose text is a MATH test problem's: left out of training if it is held out.
    assert stats["train"] == 7498 - len(stats["train_dropped_as_heldout"])
    train = [MathProblem.from_dict(r) for r in io.read_jsonl(rd / "data/train.jsonl")]
    assert shared_questions(train, heldout) == []

    # The pipeline's eval stages evaluate `math` on what is left of MATH test (eval.exclude_from).
    config.eval.exclude_from = str(rd / "data/heldout.jsonl")
    data = load_eval_data(config)
    assert {k: len(v) for k, v in data.benchmarks.items()} == {"math": 4000, "math500": 500, "gsm8k": 1319}
    assert data.dropped["math"]["excluded"] == 1000 and data.dropped["math500"]["excluded"] == 0
    assert shared_questions(data.benchmarks["math"], heldout) == []


def test_pipeline_refuses_a_heldout_set_that_overlaps_an_evaluated_benchmark(tmp_path):
    # The whole of MATH test as the held-out set (no split) shares all 500 MATH-500 questions.
    config = _config(tmp_path, heldout_size=0)
    config.eval.benchmarks = ("math500",)
    with pytest.raises(HeldoutOverlapError, match=r"500 held-out questions also appear in benchmark 'math500'") as e:
        run_pipeline(config, only="data")
    assert len(e.value.shared) == 500 and "math/test/precalculus/807.json" in e.value.shared
    assert all(i in str(e.value) for i in e.value.shared[:10])  # the message lists the shared questions
    assert not (tmp_path / "run/stat/data/heldout.jsonl").exists()  # refused before writing anything

    # A split that does not keep MATH-500 out is refused as well (some of its questions land in the split).
    config = _config(tmp_path, heldout_exclude=())
    config.eval.benchmarks = ("math500",)
    with pytest.raises(HeldoutOverlapError, match="benchmark 'math500'"):
        run_pipeline(config, only="data")


def test_heldout_split_needs_enough_questions(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": f"Compute {i}+1.", "solution": f"$\\boxed{{{i + 1}}}$", "type": "Algebra", "level": "Level 1"}
        for i in range(5)]))
    config = _config(tmp_path, heldout_source=str(small), heldout_size=10, heldout_exclude=())
    config.stat.stages = ("data",)
    with pytest.raises(md.DatasetError, match=r"split of 10 questions.*only 5.*stat.heldout_size"):
        run_pipeline(config, only="data")


def test_strict_data_stage_stops_at_the_first_bad_row(tmp_path):
    config = _config(tmp_path, on_bad_row="error")
    with pytest.raises(md.DatasetError, match=r"math_train\.jsonl:5530: no complete \\boxed"):
        run_pipeline(config, only="data")


def test_heldout_questions_of_subjects_without_training_questions_are_left_out_and_counted(tmp_path):
    """The real MATH train's first rows are all Algebra: with stat.train_limit=4 there is no catalog for the other
    subjects, so their held-out questions cannot be diagnosed. The data stage leaves them out and says so (before,
    the diagnose stage stopped after the rollouts were paid for)."""
    from stat_jax.errors import DataError

    config = _config(tmp_path, train_limit=4, heldout_size=40)
    assert run_pipeline(config, only="data") == {"data": "done"}
    rd = tmp_path / "run" / "stat"
    stats = io.read_json(rd / "data/manifest.json")["stats"]
    heldout = [MathProblem.from_dict(r) for r in io.read_jsonl(rd / "data/heldout.jsonl")]
    assert {p.subject for p in heldout} == {"Algebra"} and stats["heldout"] == len(heldout) > 0
    dropped = stats["heldout_dropped_no_training_subject"]
    assert "Algebra" not in dropped and len(dropped) >= 3 and sum(dropped.values()) + len(heldout) == 40

    # Nothing left to profile: a named error before any teacher or device work.
    def write(name, subject, n):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"problem": f"{subject} question {i}?", "solution": f"$\\boxed{{{i}}}$",
                                            "type": subject, "level": "Level 1"}) + "\n" for i in range(n)))
        return str(path)

    config = _config(tmp_path / "2", train_source=write("geometry.jsonl", "Geometry", 4), train_limit=0,
                     heldout_source=write("number_theory.jsonl", "Number Theory", 3), heldout_size=0,
                     heldout_exclude=())
    config.eval.benchmarks = ("gsm8k",)
    with pytest.raises(DataError, match=r"no held-out question has a subject that the training data has"):
        run_pipeline(config, only="data")
