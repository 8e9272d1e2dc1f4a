"""Shared pieces of the rollout tests: engine shapes, prompts."""

from __future__ import annotations

from stat_jax.rollout.engine import EngineSettings

# Large enough init that greedy choices are decided by clear logit margins, not float noise.
INIT_RANGE = 0.3
SETTINGS = EngineSettings(max_concurrent_decodes=3, max_prefill_length=64, max_target_length=96)


def chat_prompts(tokenizer, questions) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


# Ragged lengths crossing the 16/32/64 buckets; more prompts than the 3 slots.
QUESTIONS = ["1+1?", "what is 12 * 7", "x", "solve 3x + 4 = 19 for x, please", "hello there",
             "a much longer question that needs the largest bucket", "7"]
