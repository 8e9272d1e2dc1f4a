"""The real google-genai client against a fake Gemini server: retries, re-asks, cache, budget, key hygiene."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback

import pytest

from stat_jax.teacher import prompts
from stat_jax.teacher.base import BudgetExceeded, TeacherError
from stat_jax.teacher.client import Budget, RetryPolicy, TeacherClient, validate_answer
from stat_jax.teacher.gemini import GeminiTeacher, TeacherAuthError, find_api_key
from tests.teacher.fake_gemini import FakeGemini, prompt_of

KEY = "test-key-123"


def solve_answer(body):
    return {"solution": "Add them: \\boxed{2}", "answer": "2"}


def make_client(fake, tmp_path, *, key=KEY, max_retries=4, max_reasks=2, budget=Budget(), max_workers=4,
                sleeps=None, timeout_s=2.0):
    backend = GeminiTeacher("gemini-test", api_key=key, base_url=fake.base_url, timeout_s=timeout_s)
    return TeacherClient(backend, cache_dir=tmp_path / "cache", ledger_path=tmp_path / "ledger.jsonl",
                         max_workers=max_workers, budget=budget,
                         retry=RetryPolicy(max_retries=max_retries, initial_delay=0.001, max_delay=0.01,
                                           max_reasks=max_reasks),
                         sleep=(sleeps.append if sleeps is not None else time.sleep))


def ledger(tmp_path):
    return [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]


def test_429_500_timeout_are_retried_with_backoff(tmp_path):
    with FakeGemini(solve_answer, timeout_sleep_s=1.5) as fake:
        fake.faults.extend(["429", "500", "timeout"])
        sleeps = []
        client = make_client(fake, tmp_path, sleeps=sleeps, timeout_s=0.5)
        answer = client.ask(prompts.solve("What is 1+1?"))
    assert answer == {"solution": "Add them: \\boxed{2}", "answer": "2"}
    assert fake.count() == 4  # three faults, then the answer
    outcomes = [r["outcome"] for r in ledger(tmp_path)]
    assert outcomes == ["retryable: RetryableTeacherError"] * 3 + ["ok"]
    assert len(sleeps) == 3 and all(0 <= s <= 0.01 for s in sleeps)
    assert client.session.calls == 1 and client.session.failed_calls == 3


def test_persistent_faults_give_up_after_max_retries(tmp_path):
    with FakeGemini(solve_answer) as fake:
        fake.faults.extend(["500"] * 10)
        client = make_client(fake, tmp_path, max_retries=2, sleeps=[])
        with pytest.raises(TeacherError, match="failed after 3 attempts"):
            client.ask(prompts.solve("What is 1+1?"))
        assert fake.count() == 3


def test_malformed_and_off_schema_answers_are_reasked_with_the_error(tmp_path):
    calls = []

    def answer(body):
        calls.append(prompt_of(body))
        return {"solution": "no answer field"} if len(calls) == 1 else solve_answer(body)

    with FakeGemini(answer) as fake:
        fake.faults.append("malformed")  # first reply is not JSON; second misses "answer"; third is right
        client = make_client(fake, tmp_path, sleeps=[])
        assert client.ask(prompts.solve("What is 1+1?"))["answer"] == "2"
        prompts_seen = [prompt_of(r["body"]) for r in fake.requests]
    assert len(prompts_seen) == 3
    assert "previous answer was rejected" not in prompts_seen[0]
    assert "not valid JSON" in prompts_seen[1]
    assert "'answer' is a required property" in prompts_seen[2]


def test_reasks_are_bounded(tmp_path):
    with FakeGemini(lambda body: {"wrong": 1}) as fake:
        client = make_client(fake, tmp_path, max_reasks=1, sleeps=[])
        with pytest.raises(TeacherError, match="no schema-valid answer after 2 attempts"):
            client.ask(prompts.solve("What is 1+1?"))
        assert fake.count() == 2


def test_catalog_enum_rejects_unknown_skill():
    request = prompts.label_skills("q", None, "algebra", [{"name": "a", "description": ""}])
    assert validate_answer('{"skills": ["a"]}', request.schema)[1] is None
    assert "is not one of" in validate_answer('{"skills": ["zzz"]}', request.schema)[1]
    assert "should be non-empty" in validate_answer('{"skills": []}', request.schema)[1]


def test_a_schema_is_checked_once_and_errors_are_jsonschema_validates(monkeypatch):
    import jsonschema

    from stat_jax.teacher import client

    client._validator.cache_clear()  # another test may have validated this schema already
    request = prompts.label_skills("q", None, "algebra", [{"name": "a", "description": ""},
                                                          {"name": "b", "description": ""}])
    checks = []
    cls = jsonschema.validators.validator_for(request.schema)
    original = cls.check_schema.__func__
    monkeypatch.setattr(cls, "check_schema",
                        classmethod(lambda c, s, **kw: (checks.append(1), original(c, s, **kw))[1]))
    for answer in ('{"skills": ["a"]}', '{"skills": ["zzz"]}', '{"skills": []}', '{"skills": "a"}', '{}') * 20:
        got = validate_answer(answer, request.schema)[1]
        try:
            jsonschema.validate(json.loads(answer), request.schema)
            want = None
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "<root>"
            want = f"the answer does not fit the schema at {where}: {e.message}"
        assert got == want
    # 100 validations of one schema check it once (jsonschema.validate's 100 calls above check it 100 times)
    assert len(checks) == 1 + 100
    with pytest.raises(jsonschema.SchemaError):
        validate_answer("{}", {"type": "no-such-type"})


def test_answers_are_fsynced_unless_the_backend_says_they_are_free(tmp_path, monkeypatch):
    import os

    from stat_jax.teacher.offline import OfflineTeacher

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    requests = [prompts.solve(f"What is {i}+1?") for i in range(3)]
    with FakeGemini(solve_answer) as fake:
        make_client(fake, tmp_path / "paid").ask_many(requests)
    assert len(synced) == 3  # one per paid answer
    offline = TeacherClient(OfflineTeacher(), cache_dir=tmp_path / "free", max_workers=1)
    task_request = prompts.label_skills("Ann has 54. She keeps half. Round to tens.", None, "arithmetic",
                                        [{"name": "halving", "description": ""},
                                         {"name": "rounding", "description": ""}])
    assert offline.ask(task_request) and offline.cache.durable is False
    assert len(synced) == 3
    second = TeacherClient(OfflineTeacher(), cache_dir=tmp_path / "free", max_workers=1)
    assert second.ask(task_request) == offline.ask(task_request)
    assert second.cache_hits == 1 and second.session.calls == 0  # stored all the same: read back, not asked again


def test_cache_makes_a_second_run_free(tmp_path):
    requests = [prompts.solve(f"What is {i}+1?") for i in range(5)]
    with FakeGemini(solve_answer) as fake:
        first = make_client(fake, tmp_path).ask_many(requests)
        assert fake.count() == 5
        second_client = make_client(fake, tmp_path)
        assert second_client.ask_many(requests) == first
        assert fake.count() == 5 and second_client.cache_hits == 5 and second_client.session.calls == 0


def test_budget_stops_and_resume_pays_nothing_twice(tmp_path):
    requests = [prompts.solve(f"What is {i}+1?") for i in range(6)]
    with FakeGemini(solve_answer) as fake:
        client = make_client(fake, tmp_path, budget=Budget(max_calls=4), max_workers=2)
        with pytest.raises(BudgetExceeded, match="teacher.max_calls=4"):
            client.ask_many(requests)
        assert fake.count() == 4
        # Same budget: the ledger is over it already, so not a single new call.
        with pytest.raises(BudgetExceeded):
            make_client(fake, tmp_path, budget=Budget(max_calls=4)).ask_many(requests)
        assert fake.count() == 4
        answers = make_client(fake, tmp_path, budget=Budget(max_calls=6)).ask_many(requests)
        assert fake.count() == 6
        paid = [prompt_of(r["body"]) for r in fake.requests]
    assert len(set(paid)) == 6  # every request paid exactly once
    assert all(a["answer"] == "2" for a in answers)
    assert sum(r["outcome"] == "ok" for r in ledger(tmp_path)) == 6


def test_token_budget(tmp_path):
    with FakeGemini(solve_answer) as fake:
        client = make_client(fake, tmp_path, budget=Budget(max_tokens=1), max_workers=1)
        with pytest.raises(BudgetExceeded, match="teacher.max_tokens=1"):
            client.ask_many([prompts.solve(f"q{i}") for i in range(3)])
        assert fake.count() == 1  # the first call spends the budget; the next is refused before sending


def test_concurrency_is_bounded(tmp_path):
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(body):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return solve_answer(body)

    with FakeGemini(slow) as fake:
        make_client(fake, tmp_path, max_workers=3).ask_many([prompts.solve(f"q{i}") for i in range(12)])
    assert state["peak"] == 3


def test_invalid_key_is_one_clear_error_and_never_leaks(tmp_path, caplog, monkeypatch):
    secret = "AIza-very-secret-key-0000"
    caplog.set_level(logging.DEBUG)
    with FakeGemini(solve_answer) as fake:
        monkeypatch.setenv("GEMINI_API_KEY", secret)
        backend = GeminiTeacher("gemini-test", base_url=fake.base_url, timeout_s=2.0)
        client = TeacherClient(backend, cache_dir=tmp_path / "cache", ledger_path=tmp_path / "ledger.jsonl",
                               retry=RetryPolicy(max_retries=5, initial_delay=0.001), sleep=lambda s: None)
        with pytest.raises(TeacherAuthError) as info:
            client.ask(prompts.solve("What is 1+1?"))
        assert fake.count() == 1  # no retry storm
        assert fake.requests[0]["key"] == secret  # the key did reach the server
    message = str(info.value)
    assert "rejected the credentials from GEMINI_API_KEY" in message
    rendered = "".join(traceback.format_exception(info.value))
    files = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    for where in (message, rendered, caplog.text, files, repr(backend.backend_id)):
        assert secret not in where


def test_missing_key_names_the_variables(monkeypatch):
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TeacherAuthError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        find_api_key()


def test_the_same_request_in_flight_twice_is_paid_once(tmp_path):
    started = threading.Event()

    def slow(body):
        started.set()
        time.sleep(0.3)  # the other workers ask for the same key while this call is in flight
        return solve_answer(body)

    request = prompts.solve("What is 1+1?")
    with FakeGemini(slow) as fake:
        client = make_client(fake, tmp_path, max_workers=4)
        answers = client.ask_many([request] * 4 + [prompts.solve("What is 2+1?")])
        assert started.is_set() and fake.count() == 2  # one call per distinct request
    assert answers[:4] == [answers[0]] * 4
    assert client.session.calls == 2 and client.cache_hits == 3
    assert len(ledger(tmp_path)) == 2
