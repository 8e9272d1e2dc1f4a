"""Picking the questions the student finds difficult, with a pluggable scorer (grader accuracy or a PRM)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

from stat_jax.data.records import MathProblem


class ResponseScorer(Protocol):
    """Scores each response of each question in [0, 1] (1 = surely right)."""

    name: str

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]: ...


class AccuracyScorer:
    """1.0 for a response whose final answer the grader accepts, else 0.0 (needs reference answers)."""

    name = "accuracy"

    def __init__(self, workers: int = 2, timeout: float = 10.0):
        self.workers = workers
        self.timeout = timeout

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        from stat_jax.data import grader

        pairs = [(r, p.answer) for p, rs in zip(problems, responses) for r in rs]
        if self.workers > 0:
            results = grader.grade_many(pairs, workers=self.workers, timeout=self.timeout, progress=True)
        else:  # in-process: math-verify's own alarms bound each comparison in the main thread
            results = [grader.grade(r, a, timeout=self.timeout) for r, a in pairs]
        flat = iter([1.0 if g.correct else 0.0 for g in results])
        return [[next(flat) for _ in rs] for rs in responses]


class PRMScorer:
    """The process reward model's question-level score of each response (min or product over steps)."""

    name = "prm"

    def __init__(self, model_path: str, *, aggregate: str = "min", batch_size: int = 8, max_length: int = 4096):
        from stat_jax.models.prm import ProcessRewardModel

        self.prm = ProcessRewardModel.from_pretrained(model_path, aggregate=aggregate, max_length=max_length)
        self.batch_size = batch_size

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        flat = [(p.problem, r) for p, rs in zip(problems, responses) for r in rs]
        scores = iter(self.prm.score_responses(flat, batch_size=self.batch_size))
        return [[next(scores) for _ in rs] for rs in responses]


def select_hard(problems: Sequence[MathProblem], responses: Sequence[Sequence[str]], scores: Sequence[Sequence[float]],
                num_hard: int, seed: int, *, threshold: float = 1.0) -> list[dict[str, Any]]:
    """The `num_hard` questions with the lowest mean response score below `threshold`, hardest first.

    Ties are broken by a seeded shuffle (not by input order, which would bias toward one subject). Each row
    carries the lowest-scored response, the one the teacher diagnoses.
    """
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    rank = {i: r for r, i in enumerate(order)}
    candidates = []
    for i, (p, rs, ss) in enumerate(zip(problems, responses, scores)):
        if not rs:
            continue
        mean = sum(ss) / len(ss)
        if mean < threshold:
            worst = min(range(len(ss)), key=lambda j: (ss[j], j))
            candidates.append((mean, rank[i], i, worst))
    candidates.sort()
    rows = []
    for mean, _, i, worst in candidates[:num_hard]:
        p = problems[i]
        rows.append({**p.to_dict(), "score": mean, "response_scores": list(scores[i]),
                     "response": responses[i][worst], "response_index": worst})
    return rows
