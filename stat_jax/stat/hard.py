"""Picking the questions the student finds difficult, with a pluggable scorer.

Label-free by default: a PRM when stat.prm_path is set, else the paper's consistency heuristic (agreement among
the student's own samples). Grader accuracy against the reference answers is an option that uses labels.
Scorers are built by name from `SCORERS` (stat.scorer): a new rule is a `Scorer` subclass and one
`register_scorer` line.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from collections.abc import Callable
from typing import Any

from stat_jax.data.records import MathProblem
from stat_jax.errors import ConfigError


class Scorer:
    """Scores each response of each question in [0, 1] (1 = surely right); the hard stage keeps the questions
    whose mean score is under stat.hard_threshold, or those `hard_flags` names when the rule decides itself."""

    name = "scorer"
    uses_labels = False  # whether scoring reads the reference answers

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        raise NotImplementedError

    def hard_flags(self) -> list[bool] | None:
        """Per question of the last `score`: hard or not, when the rule decides itself (None: by threshold)."""
        return None

    def question_details(self) -> list[dict[str, Any]] | None:
        """Per question of the last `score`: what the rule read (recorded in hard/scores.jsonl), or None."""
        return None

    def hard_rule(self, stat) -> str:
        """The rule that makes a question hard, as the hard stage's manifest states it."""
        return f"{self.name}: mean response score < stat.hard_threshold={stat.hard_threshold}"

    @property
    def manifest(self) -> dict[str, Any]:
        """What else the hard stage's manifest records about this scorer."""
        return {}


# stat.scorer name -> build(config) -> Scorer
SCORERS: dict[str, Callable[[Any], Scorer]] = {}


def register_scorer(name: str, build: Callable[[Any], Scorer]) -> None:
    """Makes `stat.scorer=name` build its scorer with `build(config)`."""
    SCORERS[name] = build


def build_scorer(config) -> Scorer:
    """The scorer stat.scorer names (`auto` resolved by `scorer_name`)."""
    return SCORERS[scorer_name(config.stat)](config)


class AccuracyScorer(Scorer):
    """1.0 for a response whose final answer the grader accepts, else 0.0 (needs reference answers).

    `grading` is the held-out benchmark's headline grading (eval.headline): "strict" reads the last \\boxed{},
    "flexible" the benchmark's flexible rule `flexible_rule` (stat_jax.data.grader.FLEXIBLE_RULES).
    """

    name = "accuracy"
    uses_labels = True

    def __init__(self, workers: int = 2, timeout: float = 10.0, grading: str = "strict", flexible_rule: str = "math"):
        from stat_jax.data import grader

        if grading not in ("strict", "flexible"):
            raise ConfigError(f"accuracy grading {grading!r}: choose strict or flexible (eval.headline)")
        grader.check_flexible_rule(flexible_rule)
        self.workers = workers
        self.timeout = timeout
        self.grading = grading
        self.flexible_rule = flexible_rule

    @property
    def manifest(self) -> dict[str, Any]:
        """The grading rule the hard stage's accuracy used, for its manifest."""
        from stat_jax.data import grader

        rule = grader.STRICT_RULE if self.grading == "strict" else grader.FLEXIBLE_RULES[self.flexible_rule][1]
        return {"grading": self.grading, "grading_rule": rule}

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        from stat_jax.data import grader

        pairs = [(r, p.answer) for p, rs in zip(problems, responses) for r in rs]
        flexible = self.flexible_rule if self.grading == "flexible" else None
        if self.workers > 0:
            results = grader.grade_many(pairs, workers=self.workers, timeout=self.timeout, progress=True,
                                        flexible=flexible)
        else:  # in-process: math-verify's own alarms bound each comparison in the main thread
            results = [grader.grade(r, a, timeout=self.timeout, flexible=flexible) for r, a in pairs]
        right = [g.flexible_correct if flexible else g.correct for g in results]
        flat = iter([1.0 if ok else 0.0 for ok in right])
        return [[next(flat) for _ in rs] for rs in responses]


def scorer_name(stat) -> str:
    """stat.scorer with `auto` resolved: the PRM when stat.prm_path is set, else the consistency heuristic."""
    name = stat.scorer
    if name == "auto":
        return "prm" if stat.get("prm_path", "") else "consistency"
    if name not in SCORERS:
        raise ConfigError(f"stat.scorer={name!r}: choose one of {('auto', *SCORERS)}")
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


class ConsistencyScorer(Scorer):
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

    def hard_rule(self, stat) -> str:
        return (f"{self.name}: fewer than stat.consistency_min_agree={self.min_agree} of the "
                f"stat.rollout_samples={stat.rollout_samples} final answers agree")

    def question_details(self) -> list[dict[str, Any]]:
        """Per question of the last `score`: the final answers read and the largest agreeing group's size."""
        return [{"final_answers": a, "agreement": n} for a, n in zip(self.final_answers, self.agreement)]


class PRMScorer(Scorer):
    """A process reward model's verdict on each response (`stat.prm_*`; needs no reference answers).

    Rule `paper` (default): 1.0 when the response's step scores pass the paper's thresholds, 0.0 when the PRM
    flags it (last step <= stat.prm_last_step_threshold, mean <= stat.prm_mean_threshold, or an earlier step
    <= stat.prm_earlier_step_threshold), so with one sample per question `select_hard` keeps exactly the
    paper's difficult questions, and with several it ranks them by the share of flagged answers. Rules `min` /
    `product`: that aggregate of the step scores. Responses are split into steps at blank lines.
    """

    name = "prm"
    RULES = ("paper", "min", "product")

    def __init__(self, step_scorer, *, rule: str = "paper", last: float = 0.85, mean: float = 0.85,
                 earlier: float = 0.7):
        if rule not in self.RULES:
            raise ValueError(f"stat.prm_rule={rule!r}: choose one of {self.RULES}")
        self.step_scorer = step_scorer
        self.rule = rule
        self.thresholds = {"last": float(last), "mean": float(mean), "earlier": float(earlier)}
        self.step_scores: list[list[list[float]]] = []  # [question][response][step], from the last `score`

    @classmethod
    def from_config(cls, stat, mesh=None) -> PRMScorer:
        """The scorer `stat.prm_*` describe, its PRM sharded on `mesh`."""
        from stat_jax.models.prm import load_step_scorer

        if not stat.prm_path:
            raise ValueError("stat.scorer='prm' needs --config.stat.prm_path=/path/to/a PRM checkpoint (HF dir; "
                             "the paper's is RLHFlow/Llama3.1-8B-PRM-Mistral-Data, stat.prm_format=rlhflow)")
        step_scorer = load_step_scorer(stat.prm_path, stat.prm_format, mesh=mesh, dtype=stat.prm_dtype,
                                       max_length=stat.prm_max_length, batch_size=stat.prm_batch_size)
        return cls(step_scorer, rule=stat.prm_rule, last=stat.prm_last_step_threshold,
                   mean=stat.prm_mean_threshold, earlier=stat.prm_earlier_step_threshold)

    def response_score(self, steps: Sequence[float]) -> float:
        from stat_jax.models.prm import is_hard_by_step_scores

        if self.rule == "paper":
            return 0.0 if is_hard_by_step_scores(steps, **self.thresholds) else 1.0
        return min(steps) if self.rule == "min" else math.prod(steps)

    def score(self, problems: Sequence[MathProblem], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        from stat_jax.models.prm import split_steps

        items = [(p.problem, split_steps(r)) for p, rs in zip(problems, responses) for r in rs]
        flat = iter(self.step_scorer.score_many(items))
        self.step_scores = [[next(flat) for _ in rs] for rs in responses]
        return [[self.response_score(steps) for steps in per_q] for per_q in self.step_scores]

    @property
    def manifest(self) -> dict[str, Any]:
        """What the hard stage's manifest records about the PRM: format, rule, and the inputs cut to fit."""
        return {"prm_format": self.step_scorer.format, "prm_rule": self.rule, "truncated": self.step_scorer.truncated,
                "truncated_steps_dropped": self.step_scorer.dropped_steps}


def _accuracy(config) -> AccuracyScorer:
    """Graded by the held-out benchmark's headline rule (eval.headline)."""
    from stat_jax.eval.evaluate import flexible_rule

    s = config.stat
    headline = config.eval.get("headline") or {}  # only the held-out benchmark's entry is read
    return AccuracyScorer(workers=s.grade_workers, timeout=config.eval.grade_timeout,
                          grading=headline.get(s.heldout_benchmark, "strict"),
                          flexible_rule=flexible_rule(s.heldout_benchmark))


def _prm(config) -> PRMScorer:
    from stat_jax import sharding

    return PRMScorer.from_config(config.stat, sharding.mesh_from_config(config.mesh))  # the student's mesh


register_scorer("consistency", lambda c: ConsistencyScorer(min_agree=c.stat.consistency_min_agree,
                                                           workers=c.stat.grade_workers, timeout=c.eval.grade_timeout))
register_scorer("accuracy", _accuracy)
register_scorer("prm", _prm)


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
