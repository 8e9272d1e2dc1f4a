"""Held-out splits without leakage: which questions are the same question, a seeded validation split, overlaps.

The STAT paper builds the Missing-Skill-Profile on a 1,000-question validation split of MATH test and
evaluates `math` on the other 4,000; MATH-500 (a subset of MATH test) must stay out of the split so it is
still unseen when evaluated. Two rows are the same question when they carry the same MATH `unique_id`
(e.g. 'test/algebra/1.json', which MATH-500 shares with MATH) or the same problem text up to whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from stat_jax.data.math_datasets import DatasetError
from stat_jax.data.records import MathProblem

# MATH release paths: the only ids that name the same question across files (others are positions in a file).
_MATH_UNIQUE_ID = re.compile(r"(?:^|/)((?:train|test)/[a-z_]+/\d+\.json)$")


class HeldoutOverlapError(DatasetError):
    """The held-out (profiling) questions share questions with a benchmark the run evaluates or trains on."""

    hint = ("keep the benchmark's questions out of the held-out split (stat.heldout_exclude), or profile on "
            "another source (stat.heldout_source)")

    def __init__(self, message: str, shared: Sequence[str] = ()):
        super().__init__(message)
        self.shared = list(shared)


def question_keys(problem: MathProblem) -> set[str]:
    """Keys that identify a question across datasets: its MATH unique_id, if any, and its normalised text."""
    keys = {"text:" + " ".join(problem.problem.split())}
    m = _MATH_UNIQUE_ID.search(problem.id)
    if m:
        keys.add("uid:" + m.group(1))
    return keys


def shared_questions(a: Sequence[MathProblem], b: Iterable[MathProblem]) -> list[MathProblem]:
    """The questions of `a` that also occur in `b` (by unique_id or by text), in `a`'s order."""
    keys = set().union(*(question_keys(p) for p in b))
    return [p for p in a if question_keys(p) & keys]


def check_disjoint(heldout: Sequence[MathProblem], other: Sequence[MathProblem], what: str,
                   *, show: int = 10) -> None:
    """Raises HeldoutOverlapError listing the held-out questions that `other` (named `what`) also holds."""
    shared = shared_questions(heldout, other)
    if shared:
        ids = [p.id for p in shared]
        raise HeldoutOverlapError(
            f"{len(shared)} held-out questions also appear in {what}, so the profile would be fitted on questions "
            f"the run is judged on: {', '.join(ids[:show])}{' ...' if len(ids) > show else ''}", ids)


def validation_split(problems: Sequence[MathProblem], size: int, seed: int,
                     exclude: Sequence[MathProblem] = ()) -> tuple[list[MathProblem], list[MathProblem]]:
    """(validation, rest): `size` questions drawn with `seed` from those not in `exclude`; rest keeps the others.

    The draw depends only on the problems' ids, the seed and the excluded set, never on file order, so the
    same files give the same split on every machine. Both lists keep the input order.
    """
    excluded = {p.id for p in shared_questions(problems, exclude)} if exclude else set()
    eligible = sorted(p.id for p in problems if p.id not in excluded)
    if size > len(eligible):
        raise DatasetError(f"a validation split of {size} questions was asked for, but only {len(eligible)} of "
                           f"{len(problems)} are eligible ({len(excluded)} excluded); lower stat.heldout_size, or "
                           f"set it to 0 to profile on the whole held-out source")
    chosen = set(np.random.default_rng(seed).permutation(np.array(eligible, dtype=object))[:size].tolist())
    return [p for p in problems if p.id in chosen], [p for p in problems if p.id not in chosen]
