"""`layers.matmul` on CPU (custom VJP): same values and gradients as float32 autodiff on the same inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stat_jax.models import layers

# Every equation the model uses, with operand shapes.
CASES = [
    ("bte,ehd->bthd", (2, 5, 8), (8, 3, 4)),
    ("bthd,hde->bte", (2, 5, 3, 4), (3, 4, 8)),
    ("bte,em->btm", (2, 5, 8), (8, 6)),
    ("btm,me->bte", (2, 5, 6), (6, 8)),
    ("bte,ev->btv", (2, 5, 8), (8, 11)),
    ("bte,ve->btv", (2, 5, 8), (11, 8)),
    ("bkqs,bksd->bkqd", (2, 3, 4, 7), (2, 3, 7, 5)),
]


def _inputs(x_shape, w_shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    # bfloat16-representable values, so float32 math on them is the exact reference.
    x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
    w = jax.random.normal(kw, w_shape).astype(jnp.bfloat16)
    return x, w


@pytest.mark.parametrize("equation,x_shape,w_shape", CASES)
def test_bfloat16_values_and_gradients_match_float32_math(equation, x_shape, w_shape):
    assert jax.default_backend() == "cpu"  # the path under test is CPU-only
    x, w = _inputs(x_shape, w_shape)
    cot = jax.random.normal(jax.random.key(1), jnp.einsum(equation, x, w).shape)

    def loss(fn, a, b):
        return jnp.sum(fn(a, b).astype(jnp.float32) * cot)

    got = layers.matmul(equation, x, w)
    want = jnp.einsum(equation, x.astype(jnp.float32), w.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)

    got_dx, got_dw = jax.grad(lambda a, b: loss(lambda p, q: layers.matmul(equation, p, q), a, b), (0, 1))(x, w)
    want_dx, want_dw = jax.grad(lambda a, b: loss(lambda p, q: jnp.einsum(equation, p, q), a, b), (0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32))
    assert got_dx.dtype == got_dw.dtype == jnp.bfloat16
    for g, ref in ((got_dx, want_dx), (got_dw, want_dw)):
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(g, np.float32), ref, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("equation,x_shape,w_shape", CASES)
def test_float32_values_and_gradients_equal_autodiff(equation, x_shape, w_shape):
    x, w = (a.astype(jnp.float32) for a in _inputs(x_shape, w_shape, seed=3))
    cot = jax.random.normal(jax.random.key(4), jnp.einsum(equation, x, w).shape)

    def grads(fn):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b) * cot), (0, 1))(x, w)

    np.testing.assert_allclose(layers.matmul(equation, x, w), jnp.einsum(equation, x, w), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(lambda a, b: layers.matmul(equation, a, b)),
                         grads(lambda a, b: jnp.einsum(equation, a, b))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float32_weights_are_cast_to_the_input_dtype():
    x, w = _inputs((2, 5, 8), (8, 6))
    got = layers.matmul("bte,em->btm", x, w.astype(jnp.float32))  # master weights are float32
    assert got.dtype == jnp.bfloat16
    x32 = x.astype(jnp.float32)
    np.testing.assert_array_equal(layers.matmul("bte,em->btm", x32, w), jnp.einsum("bte,em->btm", x32, w.astype(jnp.float32)))


def test_gradient_equations_and_unsupported_reductions():
    assert layers._gradient_equations("bte,em->btm") == ("btm,em->bte", "bte,btm->em")
    with pytest.raises(ValueError, match="summed within one operand"):
        layers._gradient_equations("btx,em->btm")  # x is summed inside the first operand alone
