"""The grader against hand-labelled (response, reference) pairs, answer extraction, and the timeout backstop."""

import pytest

from stat_jax.data import grader
from stat_jax.data.grader import GradeResult, GraderPool, grade, gsm8k_answer, last_boxed

# (response, reference, correct by a careful human grader). Grouped by what each case exercises.
HAND_LABELLED = [
    # fractions and decimals
    (r"So $\boxed{\frac{1}{2}}$.", "0.5", True),
    (r"\boxed{0.5}", r"\frac12", True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{\tfrac34}", "0.75", True),
    (r"\boxed{\frac{2}{4}}", r"\frac12", True),
    (r"\boxed{0.33}", r"\frac{1}{3}", False),  # a rounded decimal is not the exact answer
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),
    (r"\boxed{\frac{-1}{2}}", r"-\frac12", True),
    (r"\boxed{0.\overline{3}}", r"\frac13", True),  # needs the repeating-decimal rewrite
    (r"\boxed{0.1\overline{6}}", r"\frac{1}{6}", True),
    # units, money, degrees, percent
    (r"\boxed{10\text{ cm}}", "10", True),
    (r"\boxed{18 \text{ square units}}", "18", True),
    (r"\boxed{5\mbox{ dollars}}", "5", True),
    (r"\boxed{\$18.90}", "18.90", True),
    (r"\boxed{30^\circ}", "30", True),
    (r"\boxed{30}", r"30^\circ", True),
    (r"\boxed{45^\circ}", "30", False),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{25\%}", "50", False),
    # intervals and sets
    (r"\boxed{(-\infty, 2)}", r"(-\infty,2)", True),
    (r"\boxed{[1,3)}", r"(1,3]", False),
    (r"\boxed{(-\infty,-1]\cup[1,\infty)}", r"(-\infty,-1] \cup [1,\infty)", True),
    (r"\boxed{2, 1}", "1,2", True),
    # matrices and vectors
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 5 \end{pmatrix}}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", False),
    (r"\boxed{\begin{pmatrix} 1/2 & 0 \\ 0 & 1 \end{pmatrix}}", r"\begin{pmatrix} \frac12 & 0 \\ 0 & 1 \end{pmatrix}",
     True),
    # tuples and coordinates
    (r"\boxed{(-2,3)}", "(3,-2)", False),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    # wrong answers and signs
    (r"\boxed{13}", "31", False),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{3.14}", r"\pi", False),  # an exact answer was asked for
    # missing, empty, unclosed and several boxes
    ("The answer is 5.", "5", False),
    (r"\boxed{}", "5", False),
    (r"The answer is \boxed{12", "12", False),  # generation cut off inside the box
    (r"First \boxed{3}, but correcting the sign error: \boxed{5}", "5", True),
    (r"\boxed{5} ... on reflection the answer is \boxed{3}", "5", False),
    (r"so the answer is $\boxed 5$.", "5", True),
    (r"\fbox{7}", "7", True),
    # nested braces and radicals
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{2^{\frac{1}{2}}}", r"\sqrt{2}", True),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", True),
    (r"\boxed{\{1,2\}}", "1,2", True),
    # symbolic answers and equations
    (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
    (r"\boxed{i+2}", "2+i", True),
    (r"\boxed{x=5}", "5", True),
    (r"\boxed{y=2x+3}", "y = 2x + 3", True),
    # text and multiple-choice answers
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    (r"\boxed{\text{odd}}", r"\text{even}", False),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
    (r"\boxed{C}", r"\text{(C)}", True),
    (r"\boxed{\text{(B)}}", r"\text{(C)}", False),
    # integers as GSM8K / AIME write them
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{6.0}", "6", True),
    (r"\boxed{033}", "33", True),
]


@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout=10.0) as p:
        yield p


def test_enough_hand_labelled_cases():
    assert len(HAND_LABELLED) >= 40
    assert sum(not c for _, _, c in HAND_LABELLED) >= 12  # the grader must also say "wrong"


def test_pool_agrees_with_every_hand_label(pool):
    results = pool.grade_many([(r, ref) for r, ref, _ in HAND_LABELLED], progress=False)
    disagreements = [(r, ref, want, got) for (r, ref, want), got in zip(HAND_LABELLED, results) if got.correct != want]
    assert not disagreements, "\n".join(f"{r!r} vs {ref!r}: want {w}, got {g}" for r, ref, w, g in disagreements)
    assert pool.restarts == 0


def test_in_process_grade_matches_labels_on_a_sample():
    sample = HAND_LABELLED[::7]
    assert [grade(r, ref).correct for r, ref, _ in sample] == [c for _, _, c in sample]


def test_reasons_and_extracted_answer():
    assert grade("no box here", "5") == GradeResult(False, None, grader.NO_BOXED)
    assert grade(r"\boxed{ 5 }", "5") == GradeResult(True, "5", grader.EXACT)
    assert grade(r"\boxed{\dfrac12}", "0.5") == GradeResult(True, r"\dfrac12", grader.EQUIVALENT)
    assert grade(r"\boxed{4}", "5") == GradeResult(False, "4", grader.NOT_EQUIVALENT)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"a \boxed{1} b \boxed{\frac{1}{2}} c", r"\frac{1}{2}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are literals, not groups
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"$\boxed 7$.", "7"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed{3", None),
        (r"\boxed{ }", None),
        (r"\boxedx{3}", None),  # another macro, not \boxed
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_gsm8k_answer():
    assert gsm8k_answer("She pays 2 * 3 = <<2*3=6>>6.\n#### 1,234") == "1234"
    assert gsm8k_answer("... #### -5") == "-5"
    assert gsm8k_answer("no marker") is None


def test_pathological_answer_times_out_and_pool_recovers():
    # 9^(9^(9^9)) makes sympy try to evaluate an astronomically large number. With a 0.5 s budget the
    # outer wall-clock limit fires before math-verify's own 1 s alarm, so this exercises kill + replace.
    with GraderPool(workers=1, timeout=0.5) as p:
        results = p.grade_many([(r"\boxed{1}", "9^{9^{9^{9}}}"), (r"\boxed{\dfrac12}", "0.5")], progress=False)
        assert results[0] == GradeResult(False, "1", grader.TIMEOUT)
        assert results[1].correct  # the replacement worker grades the next pair
        assert p.restarts == 1


# ----- the flexible rules (pass@1_flexible) ------------------------------------------------------------------
# (response, reference, rule, strict credits, flexible credits)
FLEXIBLE_CASES = [
    # only the flexible rule credits: plain-text answers, as a small student writes them
    ("She pays 5 * 3 = 15 dollars, so the answer is $1,215.", "1215", "gsm8k", False, True),
    ("Step 1: 4 + 3 = 7\n#### 7\nI hope 9 helps", "7", "gsm8k", False, True),  # `#### N` wins over the last number
    ("The final answer is $\\frac{1}{2}$", "0.5", "math", False, True),
    ("So x = 3.", "3", "math", False, True),
    # neither credits
    ("I think 5 apples", "6", "gsm8k", False, False),
    ("The answer is 18.00", "18", "gsm8k", False, False),  # lm-eval compares strings exactly
    ("no number at all", "3", "math", False, False),
    ("x = 4", "5", "math", False, False),
    # both credit
    ("\\boxed{1/2}", "\\frac12", "math", True, True),
    ("so the total is \\boxed{42}", "42", "gsm8k", True, True),
    # only the strict rule credits: lm-eval's last number is not the boxed one
    ("\\boxed{42}, check: 42 + 1 = 43", "42", "gsm8k", True, False),
]


@pytest.mark.parametrize("response,reference,rule,strict,flexible", FLEXIBLE_CASES)
def test_flexible_rules_credit_plain_answers_the_strict_rule_does_not(response, reference, rule, strict, flexible):
    result = grade(response, reference, flexible=rule)
    assert (result.correct, result.flexible_correct) == (strict, flexible)
    assert grade(response, reference).flexible_correct is None  # not asked for: not graded


def test_pool_grades_both_rules_like_the_in_process_grader():
    pairs = [(r, ref) for r, ref, rule, _, _ in FLEXIBLE_CASES if rule == "gsm8k"]
    expected = [(s, f) for _, _, rule, s, f in FLEXIBLE_CASES if rule == "gsm8k"]
    with GraderPool(workers=2, timeout=10.0) as pool:
        got = pool.grade_many(pairs, progress=False, flexible="gsm8k")
    assert [(g.correct, g.flexible_correct) for g in got] == expected
    assert got[0].flexible_extracted == "$1,215."


def test_unknown_flexible_rule_is_refused():
    with pytest.raises(ValueError, match="unknown flexible grading rule 'lm'"):
        grade("1", "1", flexible="lm")
