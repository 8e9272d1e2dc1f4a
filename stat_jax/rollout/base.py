"""The rollout interface every consumer uses (eval, STAT profiling, GRPO).

A backend turns prompts into sampled completions. JetStream is the default backend; another engine can
replace it by implementing `RolloutBackend` without touching the trainers.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from stat_jax.errors import RolloutFailure


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy (top_p/top_k ignored)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 256
    seed: int = 0  # sample j of prompt i uses a key derived from (seed, i, j): independent of batching
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's EOS ids
    logprobs: bool = False  # return each token's sampling log-probability (Completion.logprobs); GRPO asks

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]  # generated tokens only, excluding the stop token
    text: str
    finish_reason: Literal["stop", "length"]
    # With SamplingParams.logprobs: log p(token) under the distribution the engine drew it from (temperature,
    # top-k, top-p applied, in the engine's dtype), one per token id (0 for greedy tokens); None otherwise
    logprobs: list[float] | None = None
    # the stop token it sampled and that token's log-probability (in-process backend; None when not reported)
    stop_token_id: int | None = None
    stop_logprob: float | None = None


class RolloutBackend(abc.ABC):
    """Generates completions for a batch of prompts with the current student parameters."""

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling: SamplingParams,
        n: int = 1,
        *,
        progress: bool = True,
    ) -> list[list[Completion]]:
        """Returns completions[prompt_index][sample_index]. String prompts are already chat-rendered."""

    def update_params(self, params: Any) -> None:
        """Swaps in new student parameters (same shapes) without recompiling."""
        raise NotImplementedError(f"{type(self).__name__} does not support parameter updates")

    def close(self) -> None:
        """Releases threads, servers and device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class RolloutError(RolloutFailure, RuntimeError):
    """Generation failed; the message names the backend/address and what to do."""
