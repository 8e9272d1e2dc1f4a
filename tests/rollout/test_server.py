"""JetStream's gRPC server on 127.0.0.1 with the stat-jax client: same tokens as in-process, clean shutdown."""

from __future__ import annotations

import threading
import time

import portpicker
import pytest

from stat_jax.rollout.base import RolloutError, SamplingParams
from stat_jax.rollout.client import JetStreamClient
from stat_jax.rollout.engine import HFTokenizer, StudentEngine, js
from stat_jax.rollout.inprocess import JetStreamBackend
from stat_jax.rollout.server import RunningServer, serve_until_stopped
from tests.rollout.fixtures import QUESTIONS, SETTINGS, chat_prompts

GREEDY = SamplingParams(max_new_tokens=10)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=3)
WITH_LOGPROBS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=3, logprobs=True)


def test_server_answers_client_on_loopback_and_shuts_down(student):
    prompts = chat_prompts(student.tokenizer, QUESTIONS[:4])
    with JetStreamBackend(student.model, student.tokenizer, SETTINGS) as local:
        expected_greedy = local.generate(prompts, GREEDY, progress=False)
        expected_sampled = local.generate(prompts, SAMPLED, n=2, progress=False)
        expected_logprobs = local.generate(prompts, WITH_LOGPROBS, n=2, progress=False)

    engine = StudentEngine(student.model, HFTokenizer(student.tokenizer), SETTINGS)
    port = portpicker.pick_unused_port()
    running = RunningServer(engine, "127.0.0.1", port)
    assert js.server_lib._HOST == "127.0.0.1"
    stop = threading.Event()
    exit_code = []
    serving = threading.Thread(target=lambda: exit_code.append(serve_until_stopped(running, stop, poll_s=0.1)))
    serving.start()
    client = JetStreamClient(f"127.0.0.1:{port}", student.tokenizer, retries=1, backoff_s=0.1)
    try:
        assert client.health_check()
        greedy = client.generate(prompts, GREEDY, progress=False)
        sampled = client.generate(prompts, SAMPLED, n=2, progress=False)
        with_logprobs = client.generate(prompts, WITH_LOGPROBS, n=2, progress=False)
    finally:
        t0 = time.perf_counter()
        stop.set()
        serving.join(timeout=60)
        shutdown_s = time.perf_counter() - t0
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    assert ids(greedy) == ids(expected_greedy)
    assert ids(sampled) == ids(expected_sampled)  # sampling + seeds travel with the request
    # The engine's sampling log-probs travel too (each token followed by its float32 bits): the same tokens, and
    # the in-process values up to the one-row vs batched prefill programs' float32 round-off.
    assert ids(with_logprobs) == ids(expected_sampled)
    assert all(c.logprobs is None for row in sampled for c in row)
    got = [lp for row in with_logprobs for c in row for lp in c.logprobs]
    want = [lp for row in expected_logprobs for c in row for lp in c.logprobs]
    assert len(got) == len(want) == sum(len(c.token_ids) for row in sampled for c in row)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4 and max(want) <= 0 and min(want) < -0.5
    assert [c.finish_reason for row in greedy for c in row] == [c.finish_reason for row in expected_greedy
                                                               for c in row]
    assert not serving.is_alive() and exit_code == [0] and shutdown_s < 30
    assert not any(t.is_alive() for t in running.driver._all_threads)

    # Now nothing listens there: retried, then an error naming the address.
    with pytest.raises(RolloutError, match=f"127.0.0.1:{port} is unreachable after 2 attempts"):
        client.generate(prompts[:1], GREEDY, progress=False)
    client.close()


def test_server_rejects_too_long_prompt_with_reason(student):
    engine = StudentEngine(student.model, HFTokenizer(student.tokenizer), SETTINGS)
    port = portpicker.pick_unused_port()
    running = RunningServer(engine, "127.0.0.1", port)
    client = JetStreamClient(f"127.0.0.1:{port}", student.tokenizer, retries=0)
    try:
        with pytest.raises(RolloutError, match="max_prefill_length=64"):
            client.generate([list(range(10, 80))], GREEDY, progress=False)
    finally:
        client.close()
        running.stop()
