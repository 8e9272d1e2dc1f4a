"""The shared wrapper around any teacher backend: cache, concurrency, retries, re-asks, ledger, budget.

Only `TeacherClient` talks to a backend. A request whose validated answer is in the cache costs nothing; a
paid call is appended to the ledger (JSONL) before its answer is used, and the budget is checked against the
ledger's totals (including earlier runs in the same run directory) before every call, so a run can never
spend more than configured and a resumed run never pays twice for an answer it already has.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import jsonschema
from stat_jax.progress import progress_bar

from stat_jax.teacher.base import (BudgetExceeded, RetryableTeacherError, TeacherBackend, TeacherError,
                                   TeacherRequest, TeacherResponse)
from stat_jax.teacher.cache import AnswerCache
from stat_jax.teacher.prompts import parse_json_answer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt i sleeps uniform(0, min(max_delay, initial * 2**i))."""

    max_retries: int = 5  # retries after the first attempt, for transient errors
    initial_delay: float = 1.0
    max_delay: float = 60.0
    max_reasks: int = 2  # extra attempts with the validation error when an answer does not fit the schema

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay, self.initial_delay * (2.0 ** attempt)))


@dataclasses.dataclass(frozen=True)
class Budget:
    """Hard caps over the whole ledger of a run directory; 0 means no cap."""

    max_calls: int = 0
    max_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Pricing:
    """USD per million tokens, for the ledger's cost column (an estimate; the provider's bill is the truth)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclasses.dataclass
class LedgerTotals:
    calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def validate_answer(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """Returns (parsed answer, None) when `text` is JSON fitting `schema`, else (None, what is wrong)."""
    try:
        answer = parse_json_answer(text)
    except json.JSONDecodeError as e:
        return None, f"the answer is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    error = jsonschema.exceptions.best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(answer))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        return None, f"the answer does not fit the schema at {where}: {error.message}"
    return answer, None


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str):
    """One checked validator per schema (keyed by its JSON text). `jsonschema.validate` checks the schema against
    the metaschema on every call, which was ~half of the demo's 23 s labelling of 10,000 questions; a stage asks
    one schema thousands of times. The error reported is `jsonschema.validate`'s (best_match)."""
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class TeacherClient:
    """Asks a backend for schema-valid JSON answers, cheaply and safely (see the module docstring)."""

    def __init__(
        self,
        backend: TeacherBackend,
        *,
        cache_dir: str | Path,
        ledger_path: str | Path | None = None,
        max_workers: int = 8,
        retry: RetryPolicy = RetryPolicy(),
        budget: Budget = Budget(),
        pricing: Pricing = Pricing(),
        seed: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if max_workers < 1:
            raise ValueError(f"teacher max_workers must be >= 1, got {max_workers}")
        self.backend = backend
        self.backend_id = backend.backend_id
        self.cache = AnswerCache(cache_dir, durable=getattr(backend, "durable_answers", True))
        self.ledger_path = Path(ledger_path) if ledger_path else Path(cache_dir) / "ledger.jsonl"
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self.max_workers = max_workers
        self.retry = retry
        self.budget = budget
        self.pricing = pricing
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.totals = self._read_ledger()
        self.session = LedgerTotals()  # this process only
        self.cache_hits = 0
        self._calls_in_flight = 0
        self._key_locks: dict[str, threading.Lock] = {}

    # ----- ledger and budget -------------------------------------------------------------------------------
    def _read_ledger(self) -> LedgerTotals:
        totals = LedgerTotals()
        if not self.ledger_path.exists():
            return totals
        with self.ledger_path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    # A crash mid-append can leave one torn last line; every complete line still counts.
                    log.warning("%s:%d: skipping a torn ledger line", self.ledger_path, lineno)
                    continue
                _add(totals, row)
        return totals

    def _reserve_call(self) -> None:
        """Claims one call from the budget or raises BudgetExceeded; in-flight calls count against it."""
        with self._lock:
            calls = self.totals.calls + self.totals.failed_calls + self._calls_in_flight
            if self.budget.max_calls and calls >= self.budget.max_calls:
                raise BudgetExceeded(
                    f"teacher budget spent: {calls} calls >= teacher.max_calls={self.budget.max_calls} "
                    f"(ledger {self.ledger_path}); raise it and re-run with --resume (cached answers are free)")
            if self.budget.max_tokens and self.totals.tokens >= self.budget.max_tokens:
                raise BudgetExceeded(
                    f"teacher budget spent: {self.totals.tokens} tokens >= teacher.max_tokens="
                    f"{self.budget.max_tokens} (ledger {self.ledger_path}); raise it and re-run with --resume")
            self._calls_in_flight += 1

    def _record(self, request: TeacherRequest, key: str, response: TeacherResponse | None, outcome: str,
                attempt: int) -> None:
        row = {"time": time.time(), "backend": self.backend_id, "task": request.task, "key": key,
               "outcome": outcome, "attempt": attempt}
        if response is not None:
            row.update(model=response.model, input_tokens=response.input_tokens,
                       output_tokens=response.output_tokens,
                       cost_usd=self.pricing.cost(response.input_tokens, response.output_tokens))
        with self._lock:
            self._calls_in_flight -= 1
            _add(self.totals, row)
            _add(self.session, row)
            with self.ledger_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    # ----- asking ------------------------------------------------------------------------------------------
    def ask(self, request: TeacherRequest) -> Any:
        """The validated JSON answer to `request`, from the cache or from the backend."""
        key = request.cache_key(self.backend_id)
        cached = self.cache.get(key)
        if cached is None:
            # One call per key: a second thread asking the same request while the first is in flight (a stage
            # that repeats a request; 6-7 of ~126 calls in a fake-server pipeline run) waits for its answer
            # instead of paying for it again.
            with self._lock:
                key_lock = self._key_locks.setdefault(key, threading.Lock())
            with key_lock:
                cached = self.cache.get(key)
                if cached is None:
                    return self._ask_backend(request, key)
        with self._lock:
            self.cache_hits += 1
        return cached["answer"]

    def _ask_backend(self, request: TeacherRequest, key: str) -> Any:
        reask_error: str | None = None
        for reask in range(self.retry.max_reasks + 1):
            response = self._call_with_retries(request, key, reask_error)
            answer, reask_error = validate_answer(response.text, request.schema)
            if reask_error is None:
                self.cache.put(key, {"task": request.task, "backend": self.backend_id, "answer": answer,
                                     "model": response.model})
                return answer
            log.info("teacher %s answer rejected (%s); re-asking %d/%d", request.task, reask_error, reask + 1,
                     self.retry.max_reasks)
        raise TeacherError(f"teacher task {request.task!r}: no schema-valid answer after "
                           f"{self.retry.max_reasks + 1} attempts; last problem: {reask_error}")

    def _call_with_retries(self, request: TeacherRequest, key: str, reask_error: str | None) -> TeacherResponse:
        for attempt in range(self.retry.max_retries + 1):
            self._reserve_call()
            try:
                response = self.backend.complete(request, reask_error=reask_error)
            except RetryableTeacherError as e:
                self._record(request, key, None, f"retryable: {type(e).__name__}", attempt)
                if attempt == self.retry.max_retries:
                    raise TeacherError(f"teacher task {request.task!r} failed after {attempt + 1} attempts: {e}") from e
                with self._lock:
                    delay = self.retry.delay(attempt, self._rng)
                log.info("teacher %s: %s; retry %d/%d in %.2fs", request.task, e, attempt + 1,
                         self.retry.max_retries, delay)
                self._sleep(delay)
                continue
            except BaseException:
                self._record(request, key, None, "error", attempt)
                raise
            self._record(request, key, response, "ok", attempt)
            return response
        raise AssertionError("unreachable")

    def ask_many(self, requests: Sequence[TeacherRequest], *, desc: str = "teacher") -> list[Any]:
        """Answers in request order, `max_workers` at a time; the first error (e.g. BudgetExceeded) stops all.

        Answers finished before an error are already cached, so re-running the same requests resumes.
        """
        results: list[Any] = [None] * len(requests)
        if not requests:
            return results
        stop = threading.Event()

        def one(i: int) -> None:
            if not stop.is_set():
                results[i] = self.ask(requests[i])

        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="teacher") as pool, \
                progress_bar(total=len(requests), desc=desc, unit="req", leave=False) as bar:
            futures = {pool.submit(one, i): i for i in range(len(requests))}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                bar.update(len(done))
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    stop.set()
                    for f in pending:
                        f.cancel()
                    wait(pending)
                    raise failed[0].exception()
        return results

    def summary(self) -> dict[str, Any]:
        return {"backend": self.backend_id, "cache_hits": self.cache_hits,
                "session": dataclasses.asdict(self.session), "run_total": dataclasses.asdict(self.totals),
                "ledger": str(self.ledger_path)}


def _add(totals: LedgerTotals, row: dict[str, Any]) -> None:
    if row.get("outcome") == "ok":
        totals.calls += 1
    else:
        totals.failed_calls += 1
    totals.input_tokens += int(row.get("input_tokens", 0))
    totals.output_tokens += int(row.get("output_tokens", 0))
    totals.cost_usd += float(row.get("cost_usd", 0.0))
