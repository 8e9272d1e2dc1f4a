"""Token-length limits, checked before any device work: which prompts fit, and whether a config's limits agree.

The rollout engine has two static limits (configs/base.py `rollout`): the largest prefill bucket
(`max_prefill_length`) and the KV cache per slot (`max_target_length`), which holds the prompt and every
generated token. GRPO adds its training row (`grpo.max_length`). A prompt that breaks one of them would stop
a stage halfway, so each stage tokenizes its prompts first, then skips and counts the ones that cannot run
(`rollout.on_long_prompt="skip"`), or stops before starting with all of them listed (`"error"`).

`check_config_lengths(config, command)` checks the relations between the fields themselves, so no shipped
config can fail at start: every prompt the prefill admits, plus the new tokens of each generating section,
must fit the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from stat_jax.errors import ConfigError, RolloutFailure

# Auto cache length (rollout.max_target_length=0) = the largest prompt bucket + this (STAT's rollout_max_new_tokens);
# the engine (stat_jax.rollout.engine) resolves it with this same constant.
AUTO_NEW_TOKENS = 2048

LONG_PROMPT_POLICIES = ("skip", "error")
PREFILL_BUCKETS = tuple(16 * 2**i for i in range(12))  # JetStream 0.2.2's padding buckets (token_utils)


class PromptTooLongError(RolloutFailure, ValueError):
    """A prompt does not fit the engine's buckets or cache (or a GRPO training row)."""

    hint = "raise rollout.max_prefill_length / rollout.max_target_length, or shorten the prompts"


def target_length(rollout_cfg, model_context: int | None = None) -> int:
    """rollout.max_target_length, with 0 (auto) resolved as the engine resolves it (stat_jax.rollout.engine:
    the largest prefill bucket + AUTO_NEW_TOKENS, capped by the model's context when it is known)."""
    length = int(rollout_cfg.max_target_length)
    if length:
        return length
    length = int(rollout_cfg.max_prefill_length) + AUTO_NEW_TOKENS
    return min(length, int(model_context)) if model_context else length


def local_model_context(config) -> int | None:
    """max_position_embeddings from config.model.path/config.json when that is a local directory, else None."""
    import json
    from pathlib import Path

    path = Path(str(config.model.path)) / "config.json" if "model" in config and config.model.path else None
    if path is None or not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_position_embeddings")
    return int(value) if value else None


@dataclasses.dataclass(frozen=True)
class PromptLimit:
    """What a prompt of n tokens must satisfy to be generated from with `max_new_tokens` new tokens."""

    max_prefill_length: int
    max_target_length: int
    max_new_tokens: int
    truncate: bool = False  # rollout.truncate_long_prompts: the engine keeps the last max_prefill_length tokens
    max_row_length: int = 0  # GRPO: prompt + new tokens must also fit a training row (0: no such limit)
    row_key: str = "grpo.max_length"

    @classmethod
    def from_config(cls, config, max_new_tokens: int, *, max_row_length: int = 0,
                    model_context: int | None = None) -> PromptLimit:
        """The limits config.rollout gives (auto cache length resolved as the engine does; see target_length).

        `model_context` defaults to the max_position_embeddings of a local config.model.path.
        """
        r = config.rollout
        if model_context is None and not int(r.max_target_length):
            model_context = local_model_context(config)
        return cls(int(r.max_prefill_length), target_length(r, model_context), int(max_new_tokens),
                   truncate=bool(r.truncate_long_prompts), max_row_length=int(max_row_length))

    def kept_tokens(self, n: int) -> int:
        """How many prompt tokens the engine runs (the last max_prefill_length when truncating)."""
        return min(n, self.max_prefill_length) if self.truncate else n

    def problem(self, n: int) -> str | None:
        """Why a prompt of `n` tokens cannot run (naming the config key to raise), or None when it fits."""
        if n <= 0:
            return "empty prompt: a rollout needs at least one prompt token"
        if n > self.max_prefill_length and not self.truncate:
            return (f"prompt of {n} tokens exceeds the largest prefill bucket rollout.max_prefill_length="
                    f"{self.max_prefill_length}; raise it (a power of two) or set rollout.truncate_long_prompts=True")
        kept = self.kept_tokens(n)
        # The cache holds the prompt and the generated tokens (the last token is sampled, never written, so
        # prompt + max_new_tokens == max_target_length still fits).
        if kept + self.max_new_tokens > self.max_target_length:
            return (f"prompt of {kept} tokens + max_new_tokens={self.max_new_tokens} does not fit the cache "
                    f"(rollout.max_target_length={self.max_target_length}); raise rollout.max_target_length")
        # A training row holds the whole prompt as tokenized (the engine's truncation does not shorten it).
        if self.max_row_length and n + self.max_new_tokens > self.max_row_length:
            return (f"prompt of {n} tokens + max_new_tokens={self.max_new_tokens} does not fit a training row "
                    f"({self.row_key}={self.max_row_length}); raise {self.row_key}")
        return None


@dataclasses.dataclass(frozen=True)
class LongPrompt:
    """A prompt left out before any device work: its position, its token count and why."""

    index: int
    tokens: int
    reason: str


def split_by_length(token_counts: Sequence[int], limit: PromptLimit) -> tuple[list[int], list[LongPrompt]]:
    """(indices of prompts that fit, the ones that do not) for prompts of the given token counts."""
    kept, long = [], []
    for i, n in enumerate(token_counts):
        reason = limit.problem(int(n))
        if reason is None:
            kept.append(i)
        else:
            long.append(LongPrompt(i, int(n), reason))
    return kept, long


def enforce_policy(long: Sequence[LongPrompt], policy: str, what: str, ids: Sequence[str] | None = None,
                   *, show: int = 5) -> None:
    """Raises PromptTooLongError listing every long prompt when `policy` is 'error'; 'skip' lets them go."""
    if policy not in LONG_PROMPT_POLICIES:
        raise ConfigError(f"rollout.on_long_prompt={policy!r}: choose one of {', '.join(LONG_PROMPT_POLICIES)}")
    if long and policy == "error":
        names = [ids[p.index] if ids is not None else f"#{p.index}" for p in long]
        raise PromptTooLongError(
            f"{what}: {len(long)} prompts do not fit the limits ({', '.join(names[:show])}"
            f"{' ...' if len(long) > show else ''}); the first: {long[0].reason}. Nothing was generated; "
            f"set rollout.on_long_prompt=skip to leave them out and count them instead")


def prompt_token_counts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Token counts of rendered prompts, as the rollout backends tokenize them (no special tokens added)."""
    if not prompts:
        return []
    return [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def long_prompt_report(long: Sequence[LongPrompt], ids: Sequence[str], *, examples: int = 5) -> dict[str, Any]:
    """For summaries and manifests: how many prompts were skipped, which, and why (the first few)."""
    return {"skipped_long_prompts": len(long),
            "skipped_long_prompt_examples": [{"id": ids[p.index], "tokens": p.tokens, "reason": p.reason}
                                             for p in long[:examples]]}


# ----- relations between config fields ------------------------------------------------------------------------
# What each command generates with: (section, new-tokens field) pairs whose prompts go through the rollout engine.
GENERATES = {
    "eval": (("eval", "max_new_tokens"),),
    "grpo": (("grpo", "max_new_tokens"),),
    "run": (("stat", "rollout_max_new_tokens"), ("eval", "max_new_tokens"), ("grpo", "max_new_tokens")),
    "demo": (("stat", "rollout_max_new_tokens"), ("eval", "max_new_tokens"), ("grpo", "max_new_tokens")),
    "serve": (),
    "sft": (),
}


def config_length_problems(config, command: str) -> list[str]:
    """Every incoherent length relation of `config` for `command` (a key of GENERATES), as messages."""
    if command not in GENERATES:
        raise ValueError(f"check_config_lengths: unknown command {command!r}; known: {', '.join(GENERATES)}")
    problems = []
    if "data" in config and "max_length" in config.data and int(config.data.max_length) <= 0:
        problems.append(f"data.max_length={config.data.max_length} must be > 0 (tokens per SFT row)")
    if "rollout" not in config or (command == "sft"):
        return problems
    r = config.rollout
    prefill, target = int(r.max_prefill_length), target_length(r)
    shown = f"rollout.max_target_length={target}" + (" (auto)" if not int(r.max_target_length) else "")
    if prefill not in PREFILL_BUCKETS:
        problems.append(f"rollout.max_prefill_length={prefill} must be one of the prefill buckets "
                        f"{list(PREFILL_BUCKETS)}")
    if target <= prefill:
        problems.append(f"{shown} must exceed rollout.max_prefill_length={prefill} "
                        "(the cache holds the prompt and the generated tokens)")
    if "on_long_prompt" in r and r.on_long_prompt not in LONG_PROMPT_POLICIES:
        problems.append(f"rollout.on_long_prompt={r.on_long_prompt!r} must be one of {LONG_PROMPT_POLICIES}")
    for section, key in GENERATES[command]:
        if section not in config or key not in config[section]:
            continue
        new = int(config[section][key])
        if new <= 0:
            problems.append(f"{section}.{key}={new} must be > 0")
        elif prefill + new > target:
            problems.append(
                f"{section}.{key}={new} + rollout.max_prefill_length={prefill} = {prefill + new} exceeds "
                f"{shown}: a prompt the prefill admits would not fit the cache; set "
                f"rollout.max_target_length >= {prefill + new} or lower one of them")
    if any(s == "grpo" for s, _ in GENERATES[command]) and "grpo" in config:
        g = config.grpo
        if int(g.max_length) <= int(g.max_new_tokens):
            problems.append(f"grpo.max_length={g.max_length} must exceed grpo.max_new_tokens={g.max_new_tokens} "
                            "(a training row holds the prompt and the completion)")
    return problems


def check_config_lengths(config, command: str) -> None:
    """Raises ConfigError listing every incoherent length relation (see config_length_problems)."""
    problems = config_length_problems(config, command)
    if problems:
        raise ConfigError(f"stat-jax {command}: the config's token lengths do not fit together: " + "; ".join(problems))


def drop_long_prompts(items: Sequence[Any], prompt_ids: Sequence[Sequence[int]], limit: PromptLimit, policy: str,
                      what: str, ids: Sequence[str]) -> tuple[list[Any], list[Sequence[int]], dict[str, Any]]:
    """(items, prompt ids) without the prompts over `limit`, and the report; raises first if policy is 'error'."""
    kept, long = split_by_length([len(p) for p in prompt_ids], limit)
    enforce_policy(long, policy, what, ids)
    if long and not kept:
        raise PromptTooLongError(f"{what}: none of the {len(long)} prompts fits the limits; the first: "
                                 f"{long[0].reason}")
    return [items[i] for i in kept], [prompt_ids[i] for i in kept], long_prompt_report(long, ids)
