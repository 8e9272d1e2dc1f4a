"""KV-cache decoding (prefill + one-token steps) == the full-sequence forward, row by row."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stat_jax.models import init_model
from stat_jax.models.config import RopeScaling
from stat_jax.models.llama import tiny_llama
from stat_jax.models.qwen import tiny_qwen2, tiny_qwen3

CONFIGS = {
    "llama_rope_llama3": tiny_llama(
        rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8)),
    "qwen2": tiny_qwen2(),
    "qwen3": tiny_qwen3(),
}
PROMPT_LENGTHS = (6, 2, 4)  # ragged: the prefill batch is right-padded to 6
STEPS = 4
TOL = 1e-5


def _sequences(vocab: int, seed: int = 0):
    """Per row: prompt tokens and the STEPS tokens fed back one at a time (teacher-forced)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=n) for n in PROMPT_LENGTHS]
    continuations = rng.integers(3, vocab, size=(len(PROMPT_LENGTHS), STEPS))
    return prompts, continuations


def _full_forward_logits(model, prompts, continuations):
    """Logits of the full forward on prompt + continuation, right-padded; row b valid up to its length."""
    rows = [np.concatenate([p, c]) for p, c in zip(prompts, continuations)]
    total = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), total), np.int32)
    mask = np.zeros_like(tokens)
    for b, r in enumerate(rows):
        tokens[b, : len(r)], mask[b, : len(r)] = r, 1
    positions = np.broadcast_to(np.arange(total, dtype=np.int32), tokens.shape)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, *inputs: nnx.merge(graphdef, params)(*inputs))  # faster than eager here
    return np.asarray(forward(params, tokens, positions, mask))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_steps_equal_full_forward(name):
    cfg = CONFIGS[name]
    model = init_model(cfg, seed=1)
    prompts, continuations = _sequences(cfg.vocab_size)
    full = _full_forward_logits(model, prompts, continuations)
    lengths = np.array(PROMPT_LENGTHS, np.int32)
    batch, prompt_len = len(prompts), int(lengths.max())

    # The engine's usage: one jitted function for both prefill and step, the model split outside.
    graphdef, params = nnx.split(model)

    @jax.jit
    def decode(params, tokens, positions, cache, starts):
        return nnx.merge(graphdef, params).decode(tokens, positions, cache, starts)

    cache = model.init_cache(batch, max_length=prompt_len + STEPS + 2)
    tokens = np.zeros((batch, prompt_len), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), tokens.shape)
    logits, cache = decode(params, tokens, positions, cache, jnp.zeros((batch,), jnp.int32))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits[b, :n]), full[b, :n], atol=TOL, err_msg=f"prefill row {b}")

    for step in range(STEPS):
        starts = lengths + step  # each row writes right after its own last token, overwriting prefill padding
        logits, cache = decode(params, continuations[:, step : step + 1].astype(np.int32), starts[:, None],
                               cache, jnp.asarray(starts))
        assert logits.shape == (batch, 1, cfg.vocab_size)
        for b in range(batch):
            np.testing.assert_allclose(np.asarray(logits[b, 0]), full[b, starts[b]], atol=TOL,
                                       err_msg=f"step {step} row {b}")

    # The steps really read the cache: the last step against an empty cache gives other logits.
    empty, _ = decode(params, continuations[:, -1:].astype(np.int32), starts[:, None],
                      model.init_cache(batch, max_length=prompt_len + STEPS + 2), jnp.asarray(starts))
    assert float(jnp.max(jnp.abs(empty - logits))) > 1e-3


def test_cache_layout_and_dtype():
    cfg = dataclasses.replace(tiny_llama(), num_layers=3)
    model = init_model(cfg)
    cache = model.init_cache(2, 16, dtype=jnp.bfloat16)
    assert (cache.batch_size, cache.max_length) == (2, 16)
    assert len(cache.keys) == len(cache.values) == 3
    assert cache.keys[0].shape == (2, cfg.num_kv_heads, cfg.head_dim, 16)  # keys transposed for q.K^T
    assert cache.values[0].shape == (2, cfg.num_kv_heads, 16, cfg.head_dim)
    assert cache.keys[0].dtype == jnp.bfloat16
    # Buffers must not alias: a donated cache would otherwise be freed twice.
    assert len({id(x) for x in cache.keys + cache.values}) == 6
