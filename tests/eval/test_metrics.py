"""pass@k / avg@k against hand computations and the closed-form binomial expression."""

import math

import pytest

from stat_jax.eval.metrics import grouped_metrics, mean_metrics, pass_at_k, question_metrics


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (4, 2, 1, 0.5),  # pass@1 is the fraction correct
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (3, 0, 2, 0.0),
        (3, 3, 1, 1.0),
        (6, 5, 2, 1.0),  # fewer than k wrong samples: some draw of k always has a correct one
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_formula_and_stays_finite_for_large_n():
    for n in (1, 7, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)
    assert 0 < pass_at_k(2000, 1, 1000) < 1  # C(2000, 1000) would overflow a float


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_question_metrics_and_means():
    q1 = question_metrics(True, [True, False, False, False], pass_ks=(1, 2, 4, 8))
    q2 = question_metrics(False, [False, False, True, True], pass_ks=(1, 2, 4, 8))
    assert q1 == {"pass@1": 1.0, "avg@4": 0.25, "pass@2": 0.5, "pass@4": 1.0}  # j=1 and j=8 > k left out
    assert q2 == {"pass@1": 0.0, "avg@4": 0.5, "pass@2": pytest.approx(1 - 1 / 6), "pass@4": 1.0}
    assert mean_metrics([q1, q2]) == pytest.approx({"pass@1": 0.5, "avg@4": 0.375, "pass@2": (0.5 + 5 / 6) / 2,
                                                    "pass@4": 1.0})
    assert question_metrics(None, [True], pass_ks=()) == {"avg@1": 1.0}


def test_grouped_metrics():
    records = [{"subject": "Algebra", "metrics": {"pass@1": 1.0}}, {"subject": "Algebra", "metrics": {"pass@1": 0.0}},
               {"subject": "Geometry", "metrics": {"pass@1": 1.0}}, {"subject": None, "metrics": {"pass@1": 0.0}}]
    assert grouped_metrics(records, "subject") == {"Algebra": {"n": 2, "pass@1": 0.5},
                                                   "Geometry": {"n": 1, "pass@1": 1.0}}
    assert grouped_metrics(records, "level") == {}
