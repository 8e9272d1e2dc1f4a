"""Every real benchmark file in shared/data through the loaders: exact row counts, reference answers equal to the
file's own answer field, and the project grader (math-verify) accepting every MATH-500 reference solution.

The files are read in place (never copied into the repository); see shared/data/PROVENANCE.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stat_jax.data import math_datasets as md
from stat_jax.data.grader import GraderPool, last_boxed

# shared/ sits beside the checkout; STAT_JAX_SHARED_DATA points elsewhere.
DATA = Path(os.environ.get("STAT_JAX_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real benchmark files not found at {DATA}")

# file -> (benchmark loader name, rows per PROVENANCE.md)
FILES = {
    "math_train.jsonl": ("math_train", 7500),
    "math_test.jsonl": ("math", 5000),
    "math500_test.jsonl": ("math500", 500),
    "gsm8k_train.jsonl": ("gsm8k", 7473),
    "gsm8k_test.jsonl": ("gsm8k", 1319),
    "aime24.jsonl": ("aime24", 30),
    "aime25.jsonl": ("aime25", 30),
    "amc23.jsonl": ("amc23", 40),
}
# The released MATH train set has two solutions whose final answer is an empty \boxed{} (both answers are 0,
# "(A) 0" in the problem's choices): train/number_theory/7115.json and 7117.json, lines 5530 and 5532.
MATH_TRAIN_EMPTY_BOXED_LINES = (5530, 5532)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def loaded() -> dict[str, md.LoadedBenchmark]:
    return {f: md.read_benchmark(bench, str(DATA / f), on_bad_row="skip") for f, (bench, _) in FILES.items()}


@pytest.mark.parametrize("file", sorted(FILES))
def test_every_file_loads_with_its_exact_row_count(file, loaded):
    bench, rows = FILES[file]
    result = loaded[file]
    assert len(result.problems) + len(result.bad_rows) == rows == len(_rows(file))
    assert len({p.id for p in result.problems}) == len(result.problems)  # ids are unique
    assert all(p.problem.strip() and p.answer.strip() and p.source == str(DATA / file) for p in result.problems)
    if file != "math_train.jsonl":
        assert result.bad_rows == []


def test_math_train_empty_boxed_rows_are_skipped_and_counted(loaded):
    bad = loaded["math_train.jsonl"].bad_rows
    assert [int(msg.split(":", 2)[1]) for msg in bad] == list(MATH_TRAIN_EMPTY_BOXED_LINES)
    assert all("no complete \\boxed" in msg for msg in bad)
    report = loaded["math_train.jsonl"].report()
    assert (report["problems"], report["bad_rows"]) == (7498, 2)
    with pytest.raises(md.DatasetError, match=r"math_train\.jsonl:5530: no complete \\boxed"):
        md.read_benchmark("math_train", str(DATA / "math_train.jsonl"), on_bad_row="error")


def test_reference_answers_equal_each_files_answer_field(loaded):
    for file, field in (("math500_test.jsonl", "answer"),):
        assert [p.answer for p in loaded[file].problems] == [r[field].strip() for r in _rows(file)]
    for file in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        expected = [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in _rows(file)]
        assert [p.answer for p in loaded[file].problems] == expected
        assert [p.solution for p in loaded[file].problems] == [r["answer"] for r in _rows(file)]
    for file in ("math_test.jsonl", "math_train.jsonl"):
        by_id = {r["unique_id"]: r for r in _rows(file)}
        for p in loaded[file].problems:
            row = by_id[p.id.split("/", 1)[1]]
            assert (p.problem, p.solution, p.subject, p.level) == (row["problem"], row["solution"], row["type"],
                                                                   row["level"])
            assert p.answer == last_boxed(row["solution"])


def test_aime_and_amc_answers_keep_their_value_whatever_the_type(loaded):
    types = {file: {type(r["answer"]) for r in _rows(file)} for file in ("aime24.jsonl", "aime25.jsonl", "amc23.jsonl")}
    assert types == {"aime24.jsonl": {str}, "aime25.jsonl": {str}, "amc23.jsonl": {float}}
    for file in types:
        for p, r in zip(loaded[file].problems, _rows(file)):
            value = r["answer"]
            assert p.answer == (str(int(value)) if isinstance(value, float) and value.is_integer() else str(value))
            assert float(p.answer) == float(value)  # every AIME/AMC answer here is a number
    # AIME 2025 numbers problems 1..15 in each paper: the paper keeps the ids unique.
    ids = [p.id for p in loaded["aime25.jsonl"].problems]
    assert ids[0] == "aime25/aime_2025_I/1" and ids[-1] == "aime25/aime_2025_II/15"


def test_math500_rows_are_math_test_rows(loaded):
    math = {p.id.split("/", 1)[1]: p for p in loaded["math_test.jsonl"].problems}
    for p in loaded["math500_test.jsonl"].problems:
        twin = math[p.id.split("/", 1)[1]]
        assert (twin.problem, twin.solution, twin.subject, twin.level) == (p.problem, p.solution, p.subject, p.level)


def test_grader_accepts_every_math500_reference_solution(loaded):
    """The project grader on (reference solution, answer) for all 500: no exception, no allow-list."""
    problems = loaded["math500_test.jsonl"].problems
    with GraderPool(workers=2, timeout=10.0) as pool:
        results = pool.grade_many([(p.solution, p.answer) for p in problems], progress=False)
    wrong = [(p.id, p.answer, r.extracted, r.reason) for p, r in zip(problems, results) if not r.correct]
    assert wrong == []


def test_math_verify_itself_finds_every_math500_solution_equal_to_its_answer(loaded):
    """math-verify's own extraction over the whole solution text (not our last-\\boxed shortcut) agrees too."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    wrong = []
    for p in loaded["math500_test.jsonl"].problems:
        gold = parse(f"\\boxed{{{p.answer}}}", extraction_config=config)
        pred = parse(p.solution, extraction_config=config)
        if not (gold and pred and verify(gold, pred)):
            wrong.append(p.id)
    assert wrong == []
