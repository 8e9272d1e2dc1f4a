"""`JetStreamBackend`: JetStream's orchestrator running inside the calling process, on the model's mesh.

Requests go straight onto the Driver's prefill queue (no gRPC); each collects its token ids through a small
return channel. G samples of a prompt are G requests keyed by (seed, prompt index, sample index), so results
do not depend on slot assignment or arrival order. `update_params` swaps the engine's `ParamHolder` between
calls: every compiled kernel is reused (same shapes, dtypes and shardings are enforced).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from stat_jax.progress import progress_bar

from stat_jax.data.stop_tokens import stop_token_ids
from stat_jax.models.transformer import DecoderLM
from stat_jax.rollout.base import Completion, RolloutBackend, RolloutError, SamplingParams
from stat_jax.rollout.driver import StatDriver, fit_prompt
from stat_jax.rollout.engine import EngineSettings, HFTokenizer, StudentEngine, js
from stat_jax.rollout.protocol import RequestSampling

logger = logging.getLogger(__name__)


class _Collector:
    """A request's return channel: JetStream's detokenize thread appends ids, then closes it."""

    def __init__(self, prompt_index: int, sample_index: int, done: queue.Queue):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.token_ids: list[int] = []
        self._done = done

    def add_result(self, samples) -> None:
        self.token_ids.extend(int(t) for t in samples[0].token_ids)

    def close(self) -> None:
        self._done.put(self)

    def cancel(self, unused: Any = None) -> None:
        pass


def completion_from_ids(tokenizer, prompt_index: int, sample_index: int, ids: list[int],
                        max_new_tokens: int) -> Completion:
    """A Completion; a sequence that used its whole token budget finished by length."""
    return Completion(prompt_index=prompt_index, sample_index=sample_index, token_ids=ids,
                      text=tokenizer.decode(ids, skip_special_tokens=True),
                      finish_reason="length" if len(ids) >= max_new_tokens else "stop")


def params_state_like(params: Any, reference: nnx.State) -> nnx.State:
    """`params` (a DecoderLM, nnx.State or pure dict) as a State with the reference's dtypes and shardings."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params)
    elif not isinstance(params, nnx.State):
        state = jax.tree.map(lambda x: x, reference)
        nnx.replace_by_pure_dict(state, params)
        params = state
    new_leaves, new_def = jax.tree_util.tree_flatten_with_path(params)
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    if new_def != ref_def:
        raise ValueError(f"update_params: parameter tree differs from the served model's "
                         f"({len(new_leaves)} vs {len(ref_leaves)} leaves); pass the same architecture's params")
    for (path, new), (_, ref) in zip(new_leaves, ref_leaves):
        if tuple(new.shape) != tuple(ref.shape):
            raise ValueError(f"update_params: {jax.tree_util.keystr(path)} has shape {tuple(new.shape)}, "
                             f"the served model has {tuple(ref.shape)}")
    # Same dtype and sharding as the compiled kernels expect; a no-op (no copy) when they already match.
    return jax.tree.map(lambda new, ref: jax.device_put(new.astype(ref.dtype), ref.sharding), params, reference)


class JetStreamBackend(RolloutBackend):
    """In-process rollouts through JetStream's continuous-batching orchestrator."""

    def __init__(self, model: DecoderLM, tokenizer, settings: EngineSettings = EngineSettings(), *,
                 truncate_long_prompts: bool = False, poll_s: float = 0.1):
        self.tokenizer = tokenizer
        stops = stop_token_ids(tokenizer, model.config.eos_token_ids)  # EOS ids + the template's end of turn
        self.engine = StudentEngine(model, HFTokenizer(tokenizer, stops), settings)
        self.truncate_long_prompts = truncate_long_prompts
        self._poll_s = poll_s
        self._driver: StatDriver | None = None
        self._lock = threading.Lock()  # one generate / update at a time

    # ----- driver lifecycle ---------------------------------------------------------------------------
    def _ensure_driver(self) -> StatDriver:
        if self._driver is None:
            self._driver = StatDriver(self.engine, truncate_long_prompts=self.truncate_long_prompts)
        return self._driver

    def _stop_driver(self) -> None:
        if self._driver is not None:
            driver, self._driver = self._driver, None
            driver.stop()

    def _raise_if_failed(self) -> None:
        failed = self._driver.failure() if self._driver is not None else None
        if failed is None:
            return
        error, trace = failed.error, getattr(failed, "error_traceback", "")
        self._stop_driver()
        raise RolloutError(
            f"JetStream {failed.name} thread failed: {error!r}. The rollout driver was stopped; this process and "
            f"its checkpoints are unaffected, and the next generate() starts a fresh driver reusing the compiled "
            f"engine.\nThread traceback:\n{trace}") from error

    # ----- RolloutBackend -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1, *,
                 progress: bool = True) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompt_ids = [self._prompt_ids(p, sampling.max_new_tokens, i) for i, p in enumerate(prompts)]
        with self._lock:
            driver = self._ensure_driver()
            done: queue.Queue = queue.Queue()
            for i, ids in enumerate(prompt_ids):
                for j in range(n):
                    request = js.orchestrator.ActiveRequest(
                        max_tokens=sampling.max_new_tokens, return_channel=_Collector(i, j, done),
                        prefill_content=ids, is_client_side_tokenization=True)
                    request.stat_jax_sampling = RequestSampling(sampling, i, j)
                    driver.place_request_on_prefill_queue(request)
            collected = self._wait(done, len(prompt_ids) * n, progress)
        out: list[list[Completion]] = [[None] * n for _ in prompt_ids]  # type: ignore[list-item]
        for c in collected:
            out[c.prompt_index][c.sample_index] = completion_from_ids(
                self.tokenizer, c.prompt_index, c.sample_index, c.token_ids, sampling.max_new_tokens)
        return out

    def _prompt_ids(self, prompt, max_new_tokens: int, index: int) -> np.ndarray:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else prompt
        try:
            return fit_prompt(ids, max_new_tokens, self.engine, self.truncate_long_prompts)
        except ValueError as e:
            raise RolloutError(f"prompt {index}: {e}") from e

    def _wait(self, done: queue.Queue, total: int, progress: bool) -> list[_Collector]:
        collected, tokens, start = [], 0, time.perf_counter()
        with progress_bar(total=total, desc="rollout", unit="seq", disable=not progress, leave=False) as bar:
            while len(collected) < total:
                try:
                    c = done.get(timeout=self._poll_s)
                except queue.Empty:
                    self._raise_if_failed()
                    continue
                collected.append(c)
                tokens += len(c.token_ids)
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)
        return collected

    def update_params(self, params: Any) -> None:
        """Serves `params` from the next request on; shapes must match; nothing is recompiled.

        The backend keeps references to the arrays: do not donate them to a later train step.
        """
        with self._lock:
            self.engine.params.swap(params_state_like(params, self.engine.params.state))

    def compilation_counts(self) -> dict[str, int]:
        return self.engine.compilation_counts()

    def close(self) -> None:
        with self._lock:
            self._stop_driver()
