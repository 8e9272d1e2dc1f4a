"""The demo task: deterministic splits, correct reference solutions, step tags that match the steps."""

import random
import re

import pytest

from stat_jax.data import arith_task as task

WEIGHTS = {"borrow_subtraction": 0.1, "percent": 0.1}
SIZES = {"train": 600, "heldout": 100, "test": 200}


@pytest.fixture(scope="module")
def splits():
    return task.make_splits(3, SIZES, WEIGHTS)


def _evaluate_line(line: str) -> tuple[str, int, int]:
    """Recomputes one solution line independently of the task code: (operation, claimed, true value)."""
    patterns = [
        ("add", r"^(\d+)\+(\d+)=(\d+)$", lambda a, b: a + b),
        ("sub", r"^(\d+)-(\d+)=(\d+)$", lambda a, b: a - b),
        ("mul", r"^(\d+)\*(\d+)=(\d+)$", lambda a, b: a * b),
        ("pct", r"^(\d+)% of (\d+)=(\d+)$", lambda p, x: p * x / 100),
        ("div", r"^(\d+)/(\d+)=(\d+) r(\d+)$", None),
        ("half", r"^(\d+)/2=(\d+)$", None),
        ("mod", r"^(\d+)%(\d+)=(\d+)$", lambda a, b: a % b),
        ("max", r"^max\((\d+),(\d+)\)=(\d+)$", max),
        ("round", r"^(\d+)~(\d+)$", None),
    ]
    for name, pat, fn in patterns:
        m = re.match(pat, line)
        if not m:
            continue
        g = [int(x) for x in m.groups()]
        if name == "div":
            assert g[2] * g[1] + g[3] == g[0] and 0 < g[3] < g[1], line
            return name, g[2], g[0] // g[1]
        if name == "half":
            assert g[0] % 2 == 0, line
            return name, g[1], g[0] // 2
        if name == "round":
            return name, g[1], int(g[0] / 10 + 0.5) * 10  # halves round up
        return name, g[2], fn(g[0], g[1])
    raise AssertionError(f"unreadable solution line {line!r}")


TAG_OF_OP = {"add": {"carry_addition"}, "sub": {"borrow_subtraction"}, "mul": {"multiply_by_digit", "unit_conversion"},
             "pct": {"percent"}, "div": {"division_remainder"}, "half": {"halving"}, "mod": {"modular_reduction"},
             "max": {"comparison"}, "round": {"rounding"}}


def test_same_seed_same_splits_and_disjoint(splits):
    again = task.make_splits(3, SIZES, WEIGHTS)
    assert [p.to_dict() for p in again["test"]] == [p.to_dict() for p in splits["test"]]
    assert [p.to_dict() for p in again["train"]] == [p.to_dict() for p in splits["train"]]
    other = task.make_splits(4, SIZES, WEIGHTS)
    assert [p.problem for p in other["test"]] != [p.problem for p in splits["test"]]
    texts = {name: {p.problem for p in rows} for name, rows in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["heldout"] & texts["test"]
    assert not texts["train"] & texts["heldout"]
    assert {n: len(r) for n, r in splits.items()} == SIZES


def test_every_reference_solution_is_right_and_tagged(splits):
    for p in [*splits["train"], *splits["test"]]:
        lines = p.solution.splitlines()
        assert lines[-1] == f"\\boxed{{{p.answer}}}"
        assert len(lines) - 1 == len(p.skills) and 1 <= len(p.skills) <= 3
        value = None
        for line, skill in zip(lines[:-1], p.skills):
            op, claimed, true = _evaluate_line(line)
            assert claimed == true, (p.problem, line)
            assert skill in TAG_OF_OP[op], (p.problem, line, skill)
            value = claimed
        assert str(value) == p.answer
        assert task.parse_problem(p.problem) and task.reference_answer(p.problem) == p.answer
        assert len(p.problem) + len(p.solution) < 120  # the student is character-level


def test_skills_are_exercised_for_real(splits):
    for p in splits["test"]:
        for line, skill in zip(p.solution.splitlines(), p.skills):
            nums = [int(x) for x in re.findall(r"\d+", line)]
            if skill == "carry_addition":
                assert nums[0] % 10 + nums[1] % 10 >= 10, line
            if skill == "borrow_subtraction":
                assert nums[1] % 10 > nums[0] % 10, line
            if skill in ("division_remainder", "modular_reduction"):
                assert nums[0] % nums[1] != 0, line


def test_train_split_is_imbalanced_and_test_balanced(splits):
    def share(rows, skill):
        return sum(skill in p.skills for p in rows) / len(rows)

    for skill in WEIGHTS:
        assert share(splits["train"], skill) < 0.5 * share(splits["test"], skill)
    for skill in task.SKILL_NAMES:
        assert share(splits["test"], skill) >= 0.08


def test_parse_render_round_trip_and_bad_text():
    rng = random.Random(0)
    for _ in range(200):
        start, ops = task.generate_problem(rng)
        assert task.parse_problem(task.render_problem(start, ops)) == (start, ops)
    with pytest.raises(task.ProblemParseError, match="cannot read"):
        task.parse_problem("Ann has 12. She sings.")
    with pytest.raises(KeyError, match="unknown skills"):
        task.make_splits(0, {"train": 1}, {"juggling": 0.5})


def test_new_problems_for_skill_include_it():
    rng = random.Random(1)
    for skill in task.SKILL_NAMES:
        texts = task.new_problems_for_skill(rng, skill, 3, avoid=set())
        assert len(set(texts)) == 3 and all(skill in task.problem_skills(t) for t in texts)
