"""`JetStreamBackend`: rollouts in the calling process, on the model's mesh, through the JetStream engine.

Requests run through `stat_jax.rollout.scheduler`: one deterministic continuous-batching loop over the
engine's batched prefill and generate (JetStream's orchestrator threads, which `stat-jax serve` still runs,
cost more than they give in-process). G samples of a prompt are G requests keyed by (seed, prompt index,
sample index), so results do not depend on slot assignment or arrival order. `update_params` swaps the
engine's `ParamHolder` between calls: every compiled kernel is reused (same shapes, dtypes and shardings are
enforced).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from stat_jax.progress import progress_bar

from stat_jax.data.stop_tokens import stop_token_ids
from stat_jax.distributed import peer_failure_note
from stat_jax.models.transformer import DecoderLM
from stat_jax.rollout.base import Completion, RolloutBackend, RolloutError, SamplingParams
from stat_jax.rollout.driver import fit_prompt
from stat_jax.rollout.engine import EngineSettings, HFTokenizer, StudentEngine
from stat_jax.rollout.scheduler import Request, Scheduler

logger = logging.getLogger(__name__)


def completion_from_ids(tokenizer, prompt_index: int, sample_index: int, ids: list[int],
                        max_new_tokens: int, logprobs: list[float] | None = None,
                        stop: tuple[int, float] | None = None) -> Completion:
    """A Completion; a sequence that used its whole token budget finished by length. `stop`: (the stop token
    sampled, its log-probability), kept with the log-probabilities."""
    stop = stop if logprobs is not None and len(ids) < max_new_tokens else None
    return Completion(prompt_index=prompt_index, sample_index=sample_index, token_ids=ids,
                      text=tokenizer.decode(ids, skip_special_tokens=True),
                      finish_reason="length" if len(ids) >= max_new_tokens else "stop", logprobs=logprobs,
                      stop_token_id=stop[0] if stop else None, stop_logprob=stop[1] if stop else None)


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
    """In-process rollouts: continuous batching over the JetStream engine (see stat_jax.rollout.scheduler)."""

    def __init__(self, model: DecoderLM, tokenizer, settings: EngineSettings = EngineSettings(), *,
                 truncate_long_prompts: bool = False):
        self.tokenizer = tokenizer
        stops = stop_token_ids(tokenizer, model.config.eos_token_ids)  # EOS ids + the template's end of turn
        self.engine = StudentEngine(model, HFTokenizer(tokenizer, stops), settings)
        self.truncate_long_prompts = truncate_long_prompts
        self.scheduler = Scheduler(self.engine)
        self._lock = threading.Lock()  # one generate / update at a time

    # ----- RolloutBackend -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1, *,
                 progress: bool = True) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompt_ids = [self._prompt_ids(p, sampling.max_new_tokens, i) for i, p in enumerate(prompts)]
        requests = [Request(ids, sampling, i, j) for i, ids in enumerate(prompt_ids) for j in range(n)]
        with self._lock, progress_bar(total=len(requests), desc="rollout", unit="seq", disable=not progress,
                              leave=False) as bar:
            start, tokens = time.perf_counter(), 0

            def done(req: Request) -> None:
                nonlocal tokens
                tokens += len(req.token_ids)
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}", refresh=False)

            try:
                self.scheduler.run(requests, done)
            except Exception as e:
                peers = peer_failure_note(e)  # multi-process: which host failed (a collective does not say)
                if peers:
                    raise RolloutError(f"in-process rollout failed{peers}: {e!r}. Every process of the job must "
                                       f"stop; rerun the command on every host with --resume") from e
                raise RolloutError(
                    f"in-process rollout failed: {e!r}. Its decode state was dropped; the backend and its compiled "
                    f"kernels stay usable, so the next generate() starts afresh.") from e
        out: list[list[Completion]] = [[None] * n for _ in prompt_ids]  # type: ignore[list-item]
        for r in requests:
            out[r.prompt_index][r.sample_index] = completion_from_ids(
                self.tokenizer, r.prompt_index, r.sample_index, r.token_ids, sampling.max_new_tokens,
                r.logprobs if sampling.logprobs else None, r.stop)
        return out

    def _prompt_ids(self, prompt, max_new_tokens: int, index: int) -> np.ndarray:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else prompt
        try:
            return fit_prompt(ids, max_new_tokens, self.engine, self.truncate_long_prompts)
        except ValueError as e:
            raise RolloutError(f"prompt {index}: {e}") from e

    def update_params(self, params: Any) -> None:
        """Serves `params` from the next request on; shapes must match; nothing is recompiled.

        The backend keeps references to the arrays: do not donate them to a later train step.
        """
        with self._lock:
            self.engine.params.swap(params_state_like(params, self.engine.params.state))

    def compilation_counts(self) -> dict[str, int]:
        return self.engine.compilation_counts()

    def close(self) -> None:
        """Nothing to release between calls: the decode state lives only inside `generate`."""
