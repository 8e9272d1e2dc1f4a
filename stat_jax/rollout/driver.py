"""JetStream's orchestrator `Driver`, adapted to stat-jax: one interleaved engine, checked prompts, seeds.

What differs from 0.2.2's Driver (by overriding two of its methods, nothing copied):
- `place_request_on_prefill_queue` checks the prompt before it enters the pipeline: a prompt longer than the
  largest bucket is an error naming the config keys (or, when configured, keeps its last tokens with a
  warning); prompt + max_tokens must fit the cache. 0.2.2 would truncate silently with a wrong true_length.
- `_process_prefill_content` pads token ids as given (prompts are complete, BOS included when the tokenizer
  wants one; 0.2.2 crashes on token lists without BOS) and hands the request's sampling to the engine.
- Per-request sampling travels in-process as `request.stat_jax_sampling`, over gRPC in `session_cache`
  (stat_jax/rollout/protocol.py).
- Thread failures are recorded (see jetstream_compat) and reported by `failure()` instead of killing the process.
"""

from __future__ import annotations

import logging

import numpy as np

from stat_jax.lengths import PromptLimit, PromptTooLongError  # noqa: F401  (re-exported)
from stat_jax.rollout.engine import StudentEngine, js
from stat_jax.rollout.jetstream_compat import thread_failure
from stat_jax.rollout.protocol import sampling_from_session

logger = logging.getLogger(__name__)

def fit_prompt(ids, max_new_tokens: int, engine: StudentEngine, truncate: bool) -> np.ndarray:
    """The prompt ids the engine will run, or PromptTooLongError saying which limit to raise.

    The same rule (stat_jax.lengths.PromptLimit) that the stages apply to all their prompts before starting,
    so a prompt that reaches the engine has been checked once already; this is the last line of defence.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    s = engine.settings
    limit = PromptLimit(s.max_prefill_length, s.max_target_length, int(max_new_tokens), truncate=truncate)
    reason = limit.problem(int(ids.size))
    if reason is not None:
        raise PromptTooLongError(reason)
    if ids.size > s.max_prefill_length:
        logger.warning("prompt of %d tokens truncated to its last %d (rollout.truncate_long_prompts=True)",
                       ids.size, s.max_prefill_length)
        ids = ids[-s.max_prefill_length:]
    return ids


class StatDriver(js.orchestrator.Driver):
    """The 0.2.2 Driver running one StudentEngine for both prefill and generate (interleaved mode)."""

    def __init__(self, engine: StudentEngine, *, truncate_long_prompts: bool = False):
        # Set before super().__init__, which starts the threads that read them.
        self.engine = engine
        self.truncate_long_prompts = truncate_long_prompts
        super().__init__(prefill_engines=[engine], generate_engines=[engine], prefill_params=[engine.params],
                         generate_params=[engine.params], interleaved_mode=True, jax_padding=False)

    def failure(self):
        """The first driver thread that died with an exception (its `.error`), or None."""
        return thread_failure(self._all_threads)

    def place_request_on_prefill_queue(self, request) -> None:
        content = request.prefill_content
        if isinstance(content, str):
            content = self.engine.tokenizer.hf(content, add_special_tokens=False)["input_ids"]
        request.prefill_content = fit_prompt(content, request.max_tokens, self.engine, self.truncate_long_prompts)
        super().place_request_on_prefill_queue(request)

    def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
        sampling = getattr(request, "stat_jax_sampling", None) or sampling_from_session(request.history_path)
        self.engine.set_pending_request(sampling)
        return js.token_utils.pad_tokens(
            np.asarray(request.prefill_content, np.int32), tokenizer.bos_id, tokenizer.pad_id, is_bos=False,
            max_prefill_length=max_prefill_length, jax_padding=False)
