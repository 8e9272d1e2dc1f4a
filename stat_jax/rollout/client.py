"""`JetStreamClient`: the rollout backend for a `stat-jax serve` server at host:port (JetStream gRPC).

Prompts are tokenized here and sent as token ids; each (prompt, sample) is one streaming Decode call, run
concurrently. Sampling settings and the (seed, prompt, sample) identity travel as JSON in `session_cache`
(stat_jax/rollout/protocol.py), so a served sample equals the in-process one. An unreachable server is
retried with backoff, then reported with its address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent import futures

import grpc
import numpy as np
from stat_jax.progress import progress_bar

from stat_jax.rollout.base import Completion, RolloutBackend, RolloutError, SamplingParams
from stat_jax.rollout.jetstream_compat import load_jetstream
from stat_jax.rollout.protocol import RequestSampling, sampling_to_session

logger = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class JetStreamClient(RolloutBackend):
    """Rollouts from a remote (or local) JetStream server."""

    def __init__(self, address: str, tokenizer, *, max_workers: int = 64, retries: int = 3, backoff_s: float = 1.0,
                 timeout_s: float = 3600.0):
        self.js = load_jetstream()
        self.address = address
        self.tokenizer = tokenizer
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = self.js.jetstream_pb2_grpc.OrchestratorStub(self._channel)
        self._pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jetstream-client")

    def _call_with_retry(self, what: str, call):
        """Runs `call()`, retrying on UNAVAILABLE / RESOURCE_EXHAUSTED with exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code not in _RETRYABLE:
                    raise RolloutError(f"JetStream server at {self.address} rejected {what}: "
                                       f"{code}: {e.details() if hasattr(e, 'details') else e}") from e
                if attempt == self.retries:
                    raise RolloutError(
                        f"JetStream server at {self.address} is unreachable after {self.retries + 1} attempts "
                        f"({code.name}: {e.details()}). Start it with `stat-jax serve --config=...` or point "
                        f"rollout.address at a running server.") from e
                delay = self.backoff_s * 2**attempt
                logger.warning("%s to %s failed (%s); retry %d/%d in %.1fs", what, self.address, code.name,
                               attempt + 1, self.retries, delay)
                time.sleep(delay)

    def health_check(self) -> bool:
        pb = self.js.jetstream_pb2
        response = self._call_with_retry(
            "HealthCheck", lambda: self._stub.HealthCheck(pb.HealthCheckRequest(), timeout=10.0))
        return bool(response.is_live)

    def _decode(self, ids: list[int], sampling: SamplingParams, prompt_index: int,
                sample_index: int) -> tuple[list[int], list[float] | None]:
        """(token ids, their log-probabilities when `sampling.logprobs`: the server then streams each token
        followed by its log-probability's float32 bits, see `LogprobResultTokens`)."""
        pb = self.js.jetstream_pb2
        request = pb.DecodeRequest(
            token_content=pb.DecodeRequest.TokenContent(token_ids=ids), max_tokens=sampling.max_new_tokens,
            session_cache=sampling_to_session(RequestSampling(sampling, prompt_index, sample_index)))

        def call():
            tokens: list[int] = []
            for response in self._stub.Decode(request, timeout=self.timeout_s):
                tokens.extend(response.stream_content.samples[0].token_ids)
            return tokens

        tokens = self._call_with_retry(f"Decode(prompt {prompt_index}, sample {sample_index})", call)
        if not sampling.logprobs:
            return tokens, None
        return tokens[0::2], np.asarray(tokens[1::2], np.int32).view(np.float32).tolist()

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1, *,
                 progress: bool = True) -> list[list[Completion]]:
        from stat_jax.rollout.inprocess import completion_from_ids

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompt_ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) if isinstance(p, str)
                      else [int(t) for t in p] for p in prompts]
        self.health_check()  # fail fast, with the address, before queueing thousands of calls
        jobs = {self._pool.submit(self._decode, ids, sampling, i, j): (i, j)
                for i, ids in enumerate(prompt_ids) for j in range(n)}
        out: list[list[Completion]] = [[None] * n for _ in prompt_ids]  # type: ignore[list-item]
        try:
            with progress_bar(total=len(jobs), desc=f"rollout@{self.address}", unit="seq", disable=not progress,
                      leave=False) as bar:
                for job in futures.as_completed(jobs):
                    i, j = jobs[job]
                    ids, logprobs = job.result()
                    out[i][j] = completion_from_ids(self.tokenizer, i, j, ids, sampling.max_new_tokens, logprobs)
                    bar.update(1)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._channel.close()
