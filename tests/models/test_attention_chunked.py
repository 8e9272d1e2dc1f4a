"""The training forward's query-chunked causal attention (layers.causal_attention, issue 19): the same values and
gradients as the autodiff block attention it replaced, in the whole model too, with a backward that keeps no
[queries, keys] buffer of more than one query block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stat_jax.models import layers
from stat_jax.models.llama import tiny_llama
from stat_jax.models.transformer import DecoderLM


def _inputs(b=3, t=21, h=4, kv=2, d=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.normal(size=shape), dtype)
                  for shape in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)))
    valid = np.ones((b, t), bool)
    segments = np.ones((b, t), np.int32)
    if b >= 3:
        valid[1, :4] = False  # left padding: queries 0-3 of row 1 see no key at all
        valid[2, 15:] = False  # right padding
        segments[0, 9:] = 2  # a packed row: two examples that must not see each other
    mask = (np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
            & (segments[:, :, None] == segments[:, None, :]))
    return q, k, v, jnp.asarray(mask), w


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("block", [5, 64])  # ragged last block; one block longer than the sequence
def test_chunked_attention_equals_autodiff_blocks_values_and_gradients(block):
    q, k, v, mask, w = _inputs()

    def reference(q, k, v):
        return layers.dot_product_attention(q, k, v, mask, causal_block=block)

    def chunked(q, k, v):
        return layers.causal_attention(q, k, v, mask, block=block)

    want, got = jax.jit(reference)(q, k, v), jax.jit(chunked)(q, k, v)
    assert _rel(got, want) <= 1e-6

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)

    for name, g, g0 in zip("qkv", grads(chunked), grads(reference), strict=True):
        assert float(jnp.abs(g0).max()) > 0.1, name  # the check below compares real gradients
        assert _rel(g, g0) <= 1e-5, name


def test_chunked_attention_in_bfloat16_stays_close():
    """bf16 inputs: probabilities and dS are rounded to bf16 for the products, as in the autodiff version."""
    q, k, v, mask, w = _inputs(t=40, dtype=jnp.bfloat16)
    want = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, causal_block=8))(q, k, v)
    got = jax.jit(lambda q, k, v: layers.causal_attention(q, k, v, mask, block=8))(q, k, v)
    assert got.dtype == jnp.bfloat16
    assert _rel(got.astype(jnp.float32), want.astype(jnp.float32)) <= 2e-2

    def grad(fn):
        return jax.jit(jax.grad(lambda q: jnp.sum(fn(q).astype(jnp.float32) * w.astype(jnp.float32))))(q)

    g = grad(lambda q: layers.causal_attention(q, k, v, mask, block=8))
    g0 = grad(lambda q: layers.dot_product_attention(q, k, v, mask, causal_block=8))
    assert _rel(g.astype(jnp.float32), g0.astype(jnp.float32)) <= 3e-2


def test_unaligned_keys_are_refused():
    q, k, v, mask, _ = _inputs()
    with pytest.raises(ValueError, match="aligned queries and keys"):
        layers.causal_attention(q, k[:, :-1], v[:, :-1], mask[:, :, :-1], block=5)


def test_backward_keeps_one_query_block_of_scores_not_all():
    """The compiled gradient's temporaries: the autodiff blocks keep every block's float32 probabilities
    (~t^2/2 per head); the chunked backward one block's at a time."""
    b, t, h, kv, d, block = 1, 512, 4, 2, 16, 64
    q, k, v, mask, w = _inputs(b=b, t=t, h=h, kv=kv, d=d)

    def temporaries(fn) -> int:
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    old = temporaries(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, causal_block=block))
    new = temporaries(lambda q, k, v: layers.causal_attention(q, k, v, mask, block=block))
    half_scores = b * h * t * t // 2 * 4  # all blocks' float32 probabilities
    one_block = b * h * block * t * 4
    assert old >= half_scores, (old, half_scores)  # the check can tell the two apart
    assert new <= old / 2, (new, old)
    assert new <= half_scores / 2 + 8 * one_block, (new, half_scores, one_block)


# ~40 s each on the loaded 2 cores: the default policy (full) stays in the default suite
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full",
                                   pytest.param("dots", marks=pytest.mark.slow)])
def test_model_with_chunked_attention_equals_autodiff_attention(remat):
    """Whole model (scanned layers, a remat policy): logits and all gradients of the chunked attention
    (blocks of 5 over 13 tokens) equal the model with the autodiff block attention (attention_block=0)."""
    cfg = tiny_llama(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 97, (3, 13)), jnp.int32)
    attention_mask = np.ones((3, 13), np.int32)
    attention_mask[1, :4] = 0
    attention_mask = jnp.asarray(attention_mask)
    weights = jnp.asarray(attention_mask, jnp.float32)[..., None]

    def run(attention_block):
        graphdef, params = nnx.split(DecoderLM(cfg, remat=remat, attention_block=attention_block, rngs=nnx.Rngs(4)))

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, attention_mask=attention_mask)
            return jnp.sum(jnp.tanh(logits) * weights), logits

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    (g0, logits0), (g1, logits1) = run(0), run(5)
    valid = np.asarray(attention_mask, bool)
    assert _rel(np.asarray(logits1)[valid], np.asarray(logits0)[valid]) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) <= 1e-5
