"""Final-answer extraction and grading of math responses with math-verify, in killable worker processes.

Two gradings, reported side by side (a figure always names the one that produced it):
- strict (`pass@1`, the paper's protocol): the response's LAST `\\boxed{...}` (or `\\fbox{...}`, or
  `\\boxed 5`) is correct when it equals the reference after light normalisation, or when math-verify finds the
  two LaTeX answers equivalent (fractions, decimals, percent, units, intervals, sets, matrices, expressions).
- flexible (`pass@1_flexible`), by a rule per benchmark (`FLEXIBLE_RULES`): lm-eval's GSM8K rule (the number
  after `#### `, else the last number in the response, compared as lm-eval does: exact match once commas, `$`
  and a trailing period are dropped), or for MATH-style answers the last math expression math-verify extracts
  from the whole response (a `\\boxed{}` first, then "the answer is ...", then the last LaTeX/plain expression).

math-verify bounds its own parsing/comparison with `signal.alarm`, which only works in the main thread and
cannot interrupt a long C-level computation. So `GraderPool` grades in worker processes (each task runs in
a worker's main thread, where the alarms work) and kills and replaces a worker that overruns its wall-clock
limit, so one pathological answer can neither hang a run nor take the other grades with it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from stat_jax.progress import progress_bar

logger = logging.getLogger(__name__)

# Reasons a GradeResult can carry.
EXACT = "exact"  # normalised strings are equal
EQUIVALENT = "equivalent"  # math-verify proved the answers equal
NOT_EQUIVALENT = "not_equivalent"
NO_BOXED = "no_boxed"  # the response has no (complete, non-empty) \boxed{...}
TIMEOUT = "timeout"
WORKER_DIED = "worker_died"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Whether a response is correct, the answer extracted from it, and why; the flexible rule's verdict too
    when one was asked for (None otherwise)."""

    correct: bool
    extracted: str | None
    reason: str
    flexible_correct: bool | None = None
    flexible_extracted: str | None = None


def _braced_group(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{' (escaped \\{ \\} do not count), or None."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # \{, \}, \\ are literals, never group delimiters
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str | None) -> str | None:
    """Content of the last `\\boxed{..}` / `\\fbox{..}` / `\\boxed 5` in `text`; None if absent, unclosed or empty."""
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    pos = matches[-1].end()
    if pos < len(text) and text[pos] == "{":
        content = _braced_group(text, pos)
    else:
        # `\boxed 5`: the answer is the next whitespace-delimited token (as in the MATH solutions).
        m = re.match(r"\s+([^\s$]+)", text[pos:])
        content = m.group(1) if m else None
    if content is None:
        return None
    content = content.strip()
    return content or None


def gsm8k_answer(solution: str) -> str | None:
    """The number after the last `####` of a GSM8K solution, thousands separators removed."""
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    answer = answer.rstrip(".").removeprefix("$").strip()
    return answer or None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SIZING = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING = re.compile(r"\\[,;:!]|\\quad|\\qquad|~|\s+")
_REPEATING = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\overline\{(\d+)\}")


def normalize_answer(answer: str) -> str:
    """Canonical string form used for the exact-match shortcut (never for equivalence)."""
    s = answer.strip().strip("$").strip()
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = _SIZING.sub("", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    s = _SPACING.sub("", s)
    return s.rstrip(".").lower()


def _repeating_to_fraction(m: re.Match) -> str:
    whole, fixed, period = m.group(1) or "0", m.group(2), m.group(3)
    # x = whole.fixed(period)...  =>  x = whole + (fixed.period - fixed) / (10^len(fixed) * (10^len(period) - 1))
    numerator = int(fixed + period) - int(fixed or "0")
    denominator = 10 ** len(fixed) * (10 ** len(period) - 1)
    return f"({whole}+\\frac{{{numerator}}}{{{denominator}}})"


def _alarm(timeout: float | None) -> int | None:
    """math-verify's per-step SIGALRM budget in whole seconds; None off the main thread (alarms cannot work there)."""
    return max(1, math.ceil(timeout)) if timeout and threading.current_thread() is threading.main_thread() else None


_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]


def _parse_boxed(answer: str, alarm: int | None):
    """An answer as math-verify parses it when written as \\boxed{answer} (repeating decimals rewritten first)."""
    return parse(f"\\boxed{{{_REPEATING.sub(_repeating_to_fraction, answer)}}}", extraction_config=_EXTRACTION,
                 parsing_timeout=alarm, raise_on_error=True)

# ----- the flexible rules ------------------------------------------------------------------------------
# lm-eval's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml): "strict-match" reads `#### N`, "flexible-extract" the
# last number; both then drop the `regexes_to_ignore` below and compare exactly.
_LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_LM_EVAL_IGNORE = re.compile(r",|\$|(?s:.*#### )|\.$")


def _lm_eval_clean(text: str) -> str:
    return _LM_EVAL_IGNORE.sub("", text.strip()).strip()


def gsm8k_flexible_answer(response: str) -> str | None:
    """lm-eval's GSM8K extraction: the number after the last `#### `, else the last number in the response."""
    strict = _LM_EVAL_STRICT.findall(response or "")
    if strict:
        return strict[-1]
    found = _LM_EVAL_FLEXIBLE.findall(response or "")
    if not found:
        return None
    return next(g for g in found[-1] if g)


def _grade_gsm8k_flexible(response: str, reference: str, alarm: int | None) -> tuple[bool, str | None]:
    extracted = gsm8k_flexible_answer(response)
    if extracted is None:
        return False, None
    return _lm_eval_clean(extracted) == _lm_eval_clean(reference), extracted


def _grade_math_flexible(response: str, reference: str, alarm: int | None) -> tuple[bool, str | None]:
    """math-verify's own extraction over the whole response, against the reference as a boxed answer."""
    try:
        pred = parse(response or "", extraction_config=_EXTRACTION, parsing_timeout=alarm, raise_on_error=True)
        if not pred:
            return False, None
        gold = _parse_boxed(reference, alarm)
        extracted = str(pred[-1])
        return bool(gold) and verify(gold, pred, timeout_seconds=alarm, raise_on_error=True), extracted
    except TimeoutException:
        return False, None
    except Exception as e:  # an unparsable answer is a wrong answer, not a crash of the run
        logger.debug("math-verify (flexible) failed on %.80r vs %r: %s", response, reference, e)
        return False, None


# rule name -> (grade(response, reference, alarm) -> (correct, extracted), what it does, in one line)
FLEXIBLE_RULES: dict[str, tuple[Callable[[str, str, int | None], tuple[bool, str | None]], str]] = {
    "gsm8k": (_grade_gsm8k_flexible, "lm-eval gsm8k: the number after '#### ', else the last number; exact match"),
    "math": (_grade_math_flexible, "math-verify: the last math expression of the response, checked for "
                                   "equivalence"),
}
STRICT_RULE = "the last \\boxed{} answer, checked for equivalence by math-verify (the paper's protocol)"


def check_flexible_rule(rule: str) -> None:
    if rule not in FLEXIBLE_RULES:
        raise ValueError(f"unknown flexible grading rule {rule!r}; known: {', '.join(FLEXIBLE_RULES)}")



def grade(response: str, reference: str, timeout: float | None = 5.0, flexible: str | None = None) -> GradeResult:
    """Grades one response against a reference answer, in this process: strictly, and by the flexible rule
    `flexible` (a key of FLEXIBLE_RULES) when given.

    `timeout` bounds each math-verify parse/compare step with its SIGALRM mechanism, which only works in
    the main thread (elsewhere the steps run unbounded: use `GraderPool` for untrusted batches).
    """
    strict = _grade_strict(response, reference, timeout)
    if flexible is None:
        return strict
    check_flexible_rule(flexible)
    correct, extracted = FLEXIBLE_RULES[flexible][0](response, reference, _alarm(timeout))
    return dataclasses.replace(strict, flexible_correct=correct, flexible_extracted=extracted)


def _grade_strict(response: str, reference: str, timeout: float | None) -> GradeResult:
    extracted = last_boxed(response)
    if extracted is None:
        return GradeResult(False, None, NO_BOXED)
    if normalize_answer(extracted) == normalize_answer(reference):
        return GradeResult(True, extracted, EXACT)
    alarm = _alarm(timeout)
    try:
        gold, pred = _parse_boxed(reference, alarm), _parse_boxed(extracted, alarm)
        correct = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=alarm, raise_on_error=True)
    except TimeoutException:
        return GradeResult(False, extracted, TIMEOUT)
    except Exception as e:  # an unparsable answer is a wrong answer, not a crash of the run
        logger.debug("math-verify failed on %r vs %r: %s", extracted, reference, e)
        correct = False
    return GradeResult(bool(correct), extracted, EQUIVALENT if correct else NOT_EQUIVALENT)


def _worker_loop(conn) -> None:
    """Worker process: grades (index, response, reference, timeout) tasks until it receives None."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, reference, timeout, flexible = task
        conn.send((index, grade(response, reference, timeout, flexible)))


def _mp_context():
    # forkserver: workers fork from a clean server that has math-verify/sympy imported once (cheap restarts),
    # and never from the (multithreaded, jax-holding) parent.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


class _Worker:
    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, args=(child_conn,), daemon=True, name="stat-jax-grader")
        self.process.start()
        child_conn.close()
        self.task: tuple[int, float] | None = None  # (pair index, deadline)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


def _ungraded(response: str, reason: str, flexible: str | None) -> GradeResult:
    """A response whose grading was cut off: wrong under both rules."""
    return GradeResult(False, last_boxed(response), reason, flexible_correct=False if flexible else None)


class GraderPool:
    """Worker processes grading (response, reference) pairs; a worker past `timeout` seconds is killed and replaced.

    Inside a worker, math-verify's own alarms (half the budget) usually stop a slow comparison first and the
    worker survives; the kill is the backstop for computations signals cannot interrupt.
    """

    def __init__(self, workers: int = 2, timeout: float = 10.0):
        if workers < 1:
            raise ValueError(f"GraderPool needs workers >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"GraderPool needs timeout > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self._ctx = _mp_context()
        self._workers = [_Worker(self._ctx) for _ in range(workers)]
        self.restarts = 0

    def grade_many(
        self, pairs: Iterable[tuple[str, str]], *, progress: bool = True, desc: str = "grading",
        flexible: str | None = None,
    ) -> list[GradeResult]:
        """Grades (response, reference) pairs, also by the flexible rule `flexible` when given; in input order."""
        if flexible is not None:
            check_flexible_rule(flexible)
        pairs = list(pairs)
        results: list[GradeResult | None] = [None] * len(pairs)
        queue = collections.deque(range(len(pairs)))
        inner_timeout = max(1, int(self.timeout // 2))
        with progress_bar(total=len(pairs), desc=desc, disable=not progress or not pairs, leave=False) as bar:
            while queue or any(w.task for w in self._workers):
                for i, w in enumerate(self._workers):
                    if w.task is None and queue:
                        index = queue.popleft()
                        response, reference = pairs[index]
                        try:
                            w.conn.send((index, response, reference, inner_timeout, flexible))
                        except (BrokenPipeError, OSError):
                            self._replace(i)
                            queue.appendleft(index)
                            continue
                        w.task = (index, time.monotonic() + self.timeout)
                busy = [w for w in self._workers if w.task]
                wait_s = max(0.0, min(w.task[1] for w in busy) - time.monotonic())
                ready = set(multiprocessing.connection.wait([w.conn for w in busy], timeout=wait_s))
                for i, w in enumerate(self._workers):
                    if w.task is None:
                        continue
                    index = w.task[0]
                    if w.conn in ready:
                        try:
                            _, results[index] = w.conn.recv()
                            w.task = None
                        except (EOFError, OSError):
                            logger.warning("grader worker died on pair %d; replacing it", index)
                            results[index] = _ungraded(pairs[index][0], WORKER_DIED, flexible)
                            self._replace(i)
                        bar.update(1)
                    elif time.monotonic() >= w.task[1]:
                        logger.warning("grading pair %d exceeded %.1fs; killing its worker (extracted %.80r)",
                                       index, self.timeout, last_boxed(pairs[index][0]))
                        results[index] = _ungraded(pairs[index][0], TIMEOUT, flexible)
                        self._replace(i)
                        bar.update(1)
        return results  # type: ignore[return-value]

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._ctx)
        self.restarts += 1

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def grade_many(
    pairs: Sequence[tuple[str, str]], workers: int = 2, timeout: float = 10.0, *, progress: bool = True,
    flexible: str | None = None,
) -> list[GradeResult]:
    """Grades (response, reference) pairs in a temporary process pool; also by the flexible rule `flexible`
    when given."""
    if not pairs:
        return []
    with GraderPool(workers=min(workers, len(pairs)), timeout=timeout) as tmp:
        return tmp.grade_many(pairs, progress=progress, flexible=flexible)
