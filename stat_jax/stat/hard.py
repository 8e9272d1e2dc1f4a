"""Picking the questions the student finds difficult, with a pluggable scorer.

Label-free by default: a PRM when stat.prm_path is set, else the paper's consistency heuristic (agreement among
the student's own samples). Grader accuracy against the reference answers is an option that uses labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

from stat_jax.data.records import MathProblem
from stat_jax.errors import ConfigError

SCORERS = ("auto", "consistency", "accuracy", "prm")


class ResponseScorer(Protocol):
    """Scores each response of each question in [0, 1] (1 = surely right)."""

    name: str
    uses_labels: bool  # whether scoring reads the reference answers

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]: ...


class AccuracyScorer:
    """1.0 for a response whose final answer the grader accepts, else 0.0 (needs reference answers)."""

    name = "accuracy"
    uses_labels = True

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


def scorer_name(stat) -> str:
    """stat.scorer with `auto` resolved: the PRM when stat.prm_path is set, else the consistency heuristic."""
    name = stat.scorer
    if name not in SCORERS:
        raise ConfigError(f"stat.scorer={name!r}: choose one of {SCORERS}")
    if name == "auto":
        return "prm" if stat.get("prm_path", "") else "consistency"
    return name


def check_hard_config(stat) -> None:
    """Raises ConfigError when the hard rule cannot work with stat.rollout_samples answers per question."""
    if scorer_name(stat) != "consistency":
        return
    samples, min_agree = int(stat.rollout_samples), int(stat.consistency_min_agree)
    if samples < 2:
        raise ConfigError(
            f"stat.scorer={stat.scorer!r} picks hard questions by the consistency rule (agreement among the "
            f"student's own samples), which needs stat.rollout_samples >= 2; got {samples}",
            hint="set --config.stat.rollout_samples=5 (the paper's), or choose --config.stat.scorer=accuracy "
                 "(grades against the reference answers) or stat.scorer=prm with stat.prm_path")
    if not 2 <= min_agree <= samples:
        raise ConfigError(
            f"stat.consistency_min_agree={min_agree} must be between 2 and stat.rollout_samples={samples}: "
            "a question is hard when fewer than that many of its samples share a final answer",
            hint="the paper's rule is 2 of 5 samples")


class ConsistencyScorer:
    """Label-free: a question is hard when fewer than `min_agree` of its responses share a final answer.

    The paper's heuristic (5 samples; hard when the most common answer appears fewer than 2 times), which it
    reports classifies difficult questions 79.8% as well as ground truth (the PRM: 78.0%). Final answers are the
    last \\boxed{} of each response, compared with the grader's equivalence (math-verify: 1/2 and 0.5 agree);
    a response without one agrees with none. A response scores 1.0 when it is in the largest agreeing group,
    else 0.0, so a question's mean score is the share of its responses that agree.
    """

    name = "consistency"
    uses_labels = False

    def __init__(self, min_agree: int = 2, workers: int = 2, timeout: float = 10.0):
        self.min_agree = min_agree
        self.workers = workers
        self.timeout = timeout
        self.final_answers: list[list[str | None]] = []  # [question][response], from the last `score`
        self.agreement: list[int] = []  # size of each question's largest agreeing group, from the last `score`

    def _equivalent_pairs(self) -> dict[tuple[str, str], bool]:
        """Whether each pair of distinct answers of one question is equivalent, graded in one (pooled) batch."""
        from stat_jax.data import grader

        pairs = sorted({(a, b) for per_q in self.final_answers for i, a in enumerate(per_q) for b in per_q[i + 1:]
                        if a is not None and b is not None and a != b})
        graded = [(f"\\boxed{{{a}}}", b) for a, b in pairs]  # syn.answers_equal's comparison, in the pool
        if self.workers > 0:
            results = grader.grade_many(graded, workers=self.workers, timeout=self.timeout, progress=True)
        else:  # in-process: math-verify's own alarms bound each comparison in the main thread
            results = [grader.grade(r, a, timeout=self.timeout) for r, a in graded]
        return {pair: g.correct for pair, g in zip(pairs, results)}

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        from stat_jax.stat.syn import consistency_filter, final_answer  # STAT-Syn's agreement rule, shared

        self.final_answers = [[final_answer(r) for r in rs] for rs in responses]
        equivalent = self._equivalent_pairs()

        def equal(a: str, b: str) -> bool:
            return a == b or equivalent.get((a, b), equivalent.get((b, a), False))

        scores, self.agreement = [], []
        for answers in self.final_answers:
            largest, _ = consistency_filter(answers, 1, equal)
            self.agreement.append(len(largest))
            scores.append([1.0 if j in largest else 0.0 for j in range(len(answers))])
        return scores

    def hard_flags(self) -> list[bool]:
        """Per question of the last `score`: whether fewer than `min_agree` of its responses agree."""
        return [n < self.min_agree for n in self.agreement]

    def question_details(self) -> list[dict[str, Any]]:
        """Per question of the last `score`: the final answers read and the largest agreeing group's size."""
        return [{"final_answers": a, "agreement": n} for a, n in zip(self.final_answers, self.agreement)]


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
                num_hard: int, seed: int, *, threshold: float = 1.0, hard: Sequence[bool] | None = None,
                rule: str = "") -> list[dict[str, Any]]:
    """The `num_hard` questions with the lowest mean response score below `threshold`, hardest first.

    `hard`, when given, flags the candidates instead of the threshold (a scorer's own rule, e.g. consistency).
    Ties are broken by a seeded shuffle (not by input order, which would bias toward one subject). Each row
    carries the lowest-scored response, the one the teacher diagnoses, and `rule`, the rule that chose it.
    """
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    rank = {i: r for r, i in enumerate(order)}
    candidates = []
    for i, (p, rs, ss) in enumerate(zip(problems, responses, scores)):
        if not rs:
            continue
        mean = sum(ss) / len(ss)
        if (hard[i] if hard is not None else mean < threshold):
            worst = min(range(len(ss)), key=lambda j: (ss[j], j))
            candidates.append((mean, rank[i], i, worst))
    candidates.sort()
    rows = []
    for mean, _, i, worst in candidates[:num_hard]:
        p = problems[i]
        rows.append({**p.to_dict(), "rule": rule, "score": mean, "response_scores": list(scores[i]),
                     "response": responses[i][worst], "response_index": worst})
    return rows
