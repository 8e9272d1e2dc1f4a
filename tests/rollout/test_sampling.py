"""The sampler alone: greedy limits, top-k / top-p support, and frequencies that follow the softmax."""

import jax
import jax.numpy as jnp
import numpy as np

from stat_jax.rollout import sampling
from stat_jax.rollout.sampling import request_key, step_keys

sample_tokens = jax.jit(lambda *a: sampling.sample_tokens(*a)[0])

LOGITS = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))


def _draw(n, temperature, top_p, top_k, logits=LOGITS, seed=0):
    keys = step_keys(jnp.broadcast_to(request_key(seed, 0, 0), (n, 2)), jnp.arange(n))
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    return np.asarray(sample_tokens(jnp.broadcast_to(logits, (n, logits.size)), keys, full(temperature, jnp.float32),
                                    full(top_p, jnp.float32), full(top_k, jnp.int32)))


def test_frequencies_follow_softmax_at_temperature_one():
    freq = np.bincount(_draw(4000, 1.0, 1.0, 0), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_top_k_and_top_p_restrict_support():
    assert set(_draw(500, 1.0, 1.0, 2)) == {0, 1}
    # Mass before token 2 is 0.75 < 0.8, so the nucleus is {0, 1, 2}; token 3 (mass before 0.9) is out.
    assert set(_draw(500, 1.0, 0.8, 0)) == {0, 1, 2}
    freq = np.bincount(_draw(4000, 1.0, 0.8, 0), minlength=4) / 4000  # renormalised over the nucleus
    np.testing.assert_allclose(freq[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)


def test_greedy_limits_and_mixed_rows():
    assert set(_draw(50, 1.0, 1.0, 1)) == {0}
    assert set(_draw(50, 1.0, 0.01, 0)) == {0}
    shuffled = jnp.array([0.1, 3.0, 0.2, 0.3])
    assert set(_draw(20, 0.0, 1.0, 0, logits=shuffled)) == {1}
    # One greedy row among sampled rows stays greedy.
    logits = jnp.zeros((2, 8)).at[:, 5].set(0.5)
    keys = step_keys(jnp.broadcast_to(request_key(1, 0, 0), (40, 2)), jnp.arange(40))
    rows = sample_tokens(jnp.broadcast_to(logits, (20, 2, 8)).reshape(40, 8), keys,
                         jnp.tile(jnp.array([0.0, 5.0]), 20), jnp.ones(40), jnp.zeros(40, jnp.int32))
    assert set(np.asarray(rows)[0::2]) == {5} and len(set(np.asarray(rows)[1::2])) > 1
