"""A frozen projection kernel stored quantized (int8, int4 or NF4): the quantized base of adapter training (QLoRA).

`QuantizedKernel(kernel, n_in, "int8")` replaces a projection's `nnx.Param` W [in..., out...] by the quantized
values and their scales, both `QuantizedWeight`s (frozen base state, never trained):
- int8: one absmax scale per output channel (reduced over the input axes);
- int4 / nf4: one absmax scale per block of `BLOCK` weights along the last input axis and per output channel,
  as QLoRA's NF4 (block 64). NF4's 16 levels are the normal-distribution quantiles of Dettmers et al. 2023.
Quantizing goes through `qwix.quantize` (Google's JAX quantization library, which Tunix uses for QLoRA).
Dequantizing is done here, elementwise, in the compute dtype inside each projection: qwix's own NF4 dequantize
flattens the array, which a sharded kernel cannot do without gathering it (and an explicit-axes mesh refuses).
The scales carry the kernel's logical axes (None where reduced), so shards of values and scales line up.

The storage type is the quantized values' dtype (int8, int4, uint4 = NF4 indices), so pure dicts of a
quantized base ({"qvalue", "scale"}) dequantize without any other record (`dequantize`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from stat_jax import sharding
from stat_jax.errors import ConfigError
from stat_jax.models.layers import matmul

BASE_QUANT = ("none", "int8", "int4", "nf4")
BLOCK = 64  # weights per 4-bit scale along the input axis (QLoRA's NF4 blocksize)
# NF4 levels (QLoRA, arXiv 2305.14314 App. E), as qwix's numerics.get_nf4_buckets; index = stored uint4 value.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


class QuantizedWeight(nnx.Variable):
    """Quantized values or scales of a frozen base kernel: never differentiated, no optimizer state."""


def check_base_quant(name: str) -> str:
    if name not in BASE_QUANT:
        raise ConfigError(f"train.lora.base_quant={name!r}: choose one of {', '.join(BASE_QUANT)}")
    return name


def _qwix_type(name: str):
    return {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}[check_base_quant(name)]


def quantize(w: jax.Array, n_in: int, name: str) -> tuple[jax.Array, jax.Array]:
    """(quantized values, scales) of kernel w [in..., out...] (n_in input axes) as `name` (int8, int4, nf4)."""
    import qwix  # imported here: only a quantized base needs it (and its import costs seconds)

    if name == "int8":
        tiled = {}
        channelwise = tuple(range(n_in, w.ndim))
    else:
        axis = n_in - 1
        tiled = {axis: math.gcd(int(w.shape[axis]), BLOCK)}  # tiny test shapes: the whole axis
        channelwise = tuple(a for a in range(w.ndim) if a != axis)
    q = qwix.quantize(w, _qwix_type(name), channelwise_axes=channelwise, tiled_axes=tiled)
    if q.zero_point is not None:
        raise AssertionError("symmetric absmax quantization has no zero point")
    return q.qvalue, q.scale


_quantize_jitted = jax.jit(quantize, static_argnums=(1, 2))  # one compile per kernel shape


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype=None) -> jax.Array:
    """The kernel of (values, scales) in `dtype` (default: the scales' dtype, i.e. the original kernel's).

    Elementwise (a level lookup for NF4, then one multiply by each block's scale), so shards stay local.
    """
    dtype = scale.dtype if dtype is None else dtype
    if qvalue.dtype == jnp.uint4:  # NF4 level indices
        values = jnp.asarray(NF4_LEVELS, jnp.float32)[qvalue.astype(jnp.int32)]
    else:
        values = qvalue
    values, scale = values.astype(dtype), scale.astype(dtype)
    # Split each blocked axis (scale dim s < value dim v) into [s, v // s] so the scale broadcasts per block.
    split_v, split_s = [], []
    for v, s in zip(qvalue.shape, scale.shape):
        if s in (1, v):
            split_v.append(v)
            split_s.append(s)
        else:
            split_v += [s, v // s]
            split_s += [s, 1]
    return (values.reshape(split_v) * scale.reshape(split_s)).reshape(qvalue.shape)


def is_quantized(tree) -> bool:
    """Whether a pure-dict node is a quantized kernel's {"qvalue", "scale"}."""
    return isinstance(tree, dict) and set(tree) == {"qvalue", "scale"}


def stored_bits(dtype) -> int:
    """Bits per element as XLA stores it: int4/uint4 are packed two to a byte."""
    dtype = jnp.dtype(dtype)
    return 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * dtype.itemsize


class QuantizedKernel(nnx.Module):
    """A frozen projection kernel held as quantized values + scales; projects at the input's dtype."""

    def __init__(self, kernel: nnx.Param, n_in: int, name: str):
        axes = tuple(kernel.get_metadata()["logical_axes"])
        w = kernel.get_value()
        qvalue, scale = _quantize_jitted(w, n_in, name)
        scale_axes = tuple(None if s == 1 and v != 1 else a for a, s, v in zip(axes, scale.shape, w.shape))
        if not isinstance(w, jax.core.Tracer) and isinstance(getattr(w, "sharding", None), NamedSharding):
            # A kernel loaded onto the mesh: its quantized form goes where the trainer's state shardings put it
            # (the compiled step accepts its frozen base with exactly those shardings, not whatever XLA chose).
            mesh = w.sharding.mesh
            qvalue = jax.device_put(qvalue, sharding.named_sharding(mesh, axes, qvalue.shape))
            scale = jax.device_put(scale, sharding.named_sharding(mesh, scale_axes, scale.shape))
        self.qvalue = QuantizedWeight(qvalue, logical_axes=axes)
        self.scale = QuantizedWeight(scale, logical_axes=scale_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape)

    def weight(self, dtype=None) -> jax.Array:
        return dequantize(self.qvalue[...], self.scale[...], dtype)

    def project(self, equation: str, x: jax.Array) -> jax.Array:
        return matmul(equation, x, self.weight(x.dtype))

    def merged(self) -> jax.Array:
        """The dequantized kernel in the original dtype (what an HF export writes)."""
        return self.weight()
