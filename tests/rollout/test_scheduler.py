"""The in-process scheduler: caches sized by the sequences in flight, batched prefills, auto-sized settings."""

from __future__ import annotations

import dataclasses

import pytest

from stat_jax.models.llama import tiny_llama
from stat_jax.rollout.base import SamplingParams
from stat_jax.rollout.engine import EngineSettings, cache_length_buckets, kv_bytes_per_token, resolve_settings
from stat_jax.rollout.inprocess import JetStreamBackend
from stat_jax.rollout.scheduler import padded_rows

from tests.rollout.fixtures import QUESTIONS, chat_prompts

GREEDY = SamplingParams(max_new_tokens=12)
SHORT = SamplingParams(max_new_tokens=4)  # prompts of <= 59 tokens + 4 stay within 64 positions
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=3)


def ids(out):
    return [[c.token_ids for c in row] for row in out]


@pytest.fixture(scope="module")
def long_cache(student):
    """max_target_length 1024 (buckets 64, 96, 128, 192, ..., 1024), 4 prompts of 16 tokens per prefill call."""
    settings = EngineSettings(max_concurrent_decodes=4, max_prefill_length=64, max_target_length=1024,
                              prefill_batch_tokens=64)
    with JetStreamBackend(student.model, student.tokenizer, settings) as backend:
        yield backend


def test_cache_follows_the_sequences_in_flight(student, long_cache):
    prompts = chat_prompts(student.tokenizer, QUESTIONS)
    assert max(len(student.tokenizer(p)["input_ids"]) for p in prompts) == 59
    small = EngineSettings(max_concurrent_decodes=4, max_prefill_length=64, max_target_length=160)
    with JetStreamBackend(student.model, student.tokenizer, small) as reference:
        expected_short, expected = (reference.generate(prompts, s, progress=False) for s in (SHORT, GREEDY))

    assert ids(long_cache.generate(prompts, SHORT, progress=False)) == ids(expected_short)
    # The 1024-position engine never allocated past its first bucket.
    assert long_cache.scheduler.stats["max_cache_length"] == 64 and long_cache.scheduler.stats["resizes"] == 0

    # 59 + 12 positions: the cache grows to the next bucket (96, not 128) mid-run, and the tokens stay the same.
    assert ids(long_cache.generate(prompts, GREEDY, progress=False)) == ids(expected)
    assert long_cache.scheduler.stats["max_cache_length"] == 96 and long_cache.scheduler.stats["resizes"] == 1


def test_batched_prefill_equals_one_prompt_per_call(student, long_cache):
    prompts = chat_prompts(student.tokenizer, QUESTIONS)
    batched = long_cache.generate(prompts, SAMPLED, n=2, progress=False)
    requests = len(prompts) * 2
    # 4 free slots at the start: their prompts are prefilled together by bucket (then slots free one by one).
    assert long_cache.scheduler.stats["prefill_calls"] < requests
    one_slot = EngineSettings(max_concurrent_decodes=1, max_prefill_length=64, max_target_length=1024)
    with JetStreamBackend(student.model, student.tokenizer, one_slot) as backend:
        single = backend.generate(prompts, SAMPLED, n=2, progress=False)
        assert backend.scheduler.stats["prefill_calls"] == requests
    assert ids(single) == ids(batched)
    assert len({tuple(c.token_ids) for row in batched for c in row}) > len(prompts)  # samples differ


def test_padded_rows_are_powers_of_two_within_the_limit():
    assert [padded_rows(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert padded_rows(3, 2) == 3  # never fewer rows than prompts


def test_cache_length_buckets():
    assert cache_length_buckets(3072) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072]
    assert cache_length_buckets(96) == [64, 96]
    assert cache_length_buckets(64) == [64]


def test_auto_settings_fit_the_memory_fraction():
    cfg = tiny_llama(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
    per_token = kv_bytes_per_token(cfg, "float32")
    assert per_token == 30 * 2 * 3 * 64 * 4
    auto = EngineSettings(max_concurrent_decodes=0, max_prefill_length=1024, max_target_length=0,
                          cache_memory_fraction=0.3)
    memory = 24 * 2**30
    resolved, note = resolve_settings(auto, cfg, "float32", memory)
    assert resolved.max_target_length == 1024 + 2048
    fit = int(0.3 * memory) // (3072 * per_token)  # 52 slots' worth
    assert resolved.max_concurrent_decodes == fit // 8 * 8 == 48
    assert resolved.max_concurrent_decodes * 3072 * per_token <= 0.3 * memory
    assert "48 slots x 3072 positions" in note and "float32" in note
    # bfloat16 halves the bytes per token: twice the slots.
    assert resolve_settings(auto, cfg, "bfloat16", memory)[0].max_concurrent_decodes == 104
    # The model's context caps the auto length; explicit values are kept.
    short = dataclasses.replace(cfg, max_position_embeddings=2048)
    assert resolve_settings(auto, short, "float32", memory)[0].max_target_length == 2048
    fixed = dataclasses.replace(auto, max_concurrent_decodes=5, max_target_length=2000)
    assert resolve_settings(fixed, cfg, "float32", memory)[0] == fixed
    with pytest.raises(ValueError, match="rollout.cache_memory_fraction"):
        resolve_settings(auto, cfg, "float32", 10 * 2**20)


def test_auto_slots_are_sized_for_the_run_not_the_full_cache(student):
    """Auto slots fit the memory at `max_target_length`; a run of short requests gets as many as fit at its own
    longest sequence (one wave instead of several), with the same tokens as an engine of fixed slots."""
    from stat_jax.rollout.engine import engine_memory_bytes

    prompts = chat_prompts(student.tokenizer, QUESTIONS)  # 7 prompts of <= 59 tokens
    per_token = kv_bytes_per_token(student.model.config, student.model.dtype)
    # 2 slots of 1024 positions fit; at the run's 64-position bucket that memory holds 40.
    fraction = 2.5 * 1024 * per_token / engine_memory_bytes(student.mesh)
    auto = EngineSettings(max_concurrent_decodes=0, max_prefill_length=64, max_target_length=1024,
                          cache_memory_fraction=fraction)
    with JetStreamBackend(student.model, student.tokenizer, auto) as backend:
        assert backend.engine.settings.max_concurrent_decodes == 2
        assert backend.engine.slots_for(1024) == 2 and backend.engine.slots_for(64) == 40
        out = backend.generate(prompts, SHORT, progress=False)
        # Every prompt in one wave (8 = 7 rounded to a power of two): one prefill call per bucket in use.
        assert backend.scheduler.stats["slots"] == 8
        steps_one_wave = backend.scheduler.stats["steps"]
    fixed = dataclasses.replace(auto, max_concurrent_decodes=2)
    with JetStreamBackend(student.model, student.tokenizer, fixed) as backend:
        assert ids(backend.generate(prompts, SHORT, progress=False)) == ids(out)
        assert backend.scheduler.stats["slots"] == 2  # set slots are kept as set
        assert backend.scheduler.stats["steps"] > 2 * steps_one_wave  # 4 waves of 2
