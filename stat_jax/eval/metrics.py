"""Accuracy metrics over graded samples: greedy pass@1, avg@k, and the unbiased pass@k estimator."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

FLEXIBLE_SUFFIX = "_flexible"  # a metric graded by the benchmark's flexible rule (stat_jax.data.grader)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct.

    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"),
    computed as a product to stay exact for large n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def question_metrics(greedy_correct: bool | None, sample_correct: Sequence[bool], pass_ks: Iterable[int],
                     flexible: tuple[bool | None, Sequence[bool]] | None = None) -> dict:
    """Per-question metrics: pass@1 (greedy), avg@k and pass@j (j in pass_ks, 1 < j <= k) from k samples;
    with `flexible` = (greedy, samples) graded by the flexible rule, pass@1_flexible and avg@k_flexible too."""
    out: dict[str, float] = {}
    if greedy_correct is not None:
        out["pass@1"] = float(greedy_correct)
    k = len(sample_correct)
    if k:
        c = int(sum(sample_correct))
        out[f"avg@{k}"] = c / k
        # pass@1 from samples equals avg@k, and "pass@1" already names the greedy score.
        for j in sorted({j for j in pass_ks if 1 < j <= k}):
            out[f"pass@{j}"] = pass_at_k(k, c, j)
    if flexible is not None:
        flexible_greedy, flexible_samples = flexible
        if flexible_greedy is not None:
            out[f"pass@1{FLEXIBLE_SUFFIX}"] = float(flexible_greedy)
        if flexible_samples:
            out[f"avg@{len(flexible_samples)}{FLEXIBLE_SUFFIX}"] = sum(flexible_samples) / len(flexible_samples)
    return out


def mean_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over questions (every row must have the same keys)."""
    if not rows:
        return {}
    keys = list(rows[0])
    return {key: float(np.mean([r[key] for r in rows])) for key in keys}


def grouped_metrics(records: Sequence[Mapping[str, Any]], field: str) -> dict[str, dict[str, float]]:
    """Mean metrics per value of `field` (e.g. subject, level) with the question count `n`; {} if no record has it."""
    groups: dict[str, list[Mapping[str, float]]] = collections.defaultdict(list)
    for r in records:
        if r.get(field) is not None:
            groups[str(r[field])].append(r["metrics"])
    return {name: {"n": len(rows), **mean_metrics(rows)} for name, rows in sorted(groups.items())}
