"""stat_jax's XLA CPU default (stat_jax/__init__.py): float32 dots off YNNPACK, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

_PROBE = """
import stat_jax, os, jax, jax.numpy as jnp, numpy as np
print(os.environ["XLA_FLAGS"])
a = np.ones((8, 16), np.float32)
print("ynn" in jax.jit(jnp.dot).lower(a, a.T).compile().as_text())
"""


def _probe(xla_flags: str) -> list[str]:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()


def test_importing_stat_jax_keeps_float32_dots_on_xlas_own_emitter():
    flags, uses_ynn = _probe("--xla_force_host_platform_device_count=2")
    assert flags == "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="
    assert uses_ynn == "False"


def test_a_users_own_ynn_setting_is_left_alone():
    flags, uses_ynn = _probe("--xla_cpu_experimental_ynn_fusion_type=+dot")
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=+dot"
    assert uses_ynn == "True"  # the user's choice took effect


def test_the_suites_float32_dot_is_as_accurate_as_numpys():
    """What the default buys: a K = 1,536 product with one large row (the real student's down projection has
    such rows) no further from float64 than numpy's float32 product; YNNPACK's was ~3x further."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = (rng.standard_t(2, size=(96, 1536)) * 3).astype(np.float32)
    a[0] *= 30
    b = (rng.normal(size=(1536, 576)) * 0.05).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    ours = float(np.abs(np.asarray(jnp.dot(a, b), np.float64) - exact).max())
    numpy_f32 = float(np.abs((a @ b).astype(np.float64) - exact).max())
    assert ours < 1.5 * numpy_f32, (ours, numpy_f32)
