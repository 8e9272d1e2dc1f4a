"""Layers shared by the Llama and Qwen families: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Every parameter carries `logical_axes` metadata; `stat_jax.sharding` maps those names onto the mesh.
Activations are hinted with `sharding.constrain`, a no-op outside a mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from stat_jax.models.config import ModelConfig, RopeScaling
from stat_jax.sharding import constrain


# Every matmul output carries this checkpoint name, so the `dots` remat policy (models/transformer.py) can save
# exactly them: a policy on the dot_general primitive cannot see inside `_cpu_einsum`'s custom VJP.
MATMUL_NAME = "matmul"


def matmul(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, w)` in x's dtype (w is cast to it); on CPU through `_cpu_einsum`."""
    w = w.astype(x.dtype)
    if jax.default_backend() == "cpu":
        return checkpoint_name(_cpu_einsum(equation, x, w), MATMUL_NAME)
    # GPU/TPU dots already accumulate in float32 and need no help
    return checkpoint_name(jnp.einsum(equation, x, w), MATMUL_NAME)


def _gradient_equations(equation: str) -> tuple[str, str]:
    """The einsums giving d/dx and d/dw of a two-operand einsum from the output cotangent."""
    inputs, out = equation.split("->")
    xs, ws = inputs.split(",")
    if not (set(xs) <= set(ws) | set(out) and set(ws) <= set(xs) | set(out)):
        raise ValueError(f"{equation!r}: an index summed within one operand has no einsum gradient here")
    return f"{out},{ws}->{xs}", f"{xs},{out}->{ws}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """An einsum whose forward and backward products XLA CPU runs on its fast paths (same values).

    - bfloat16: XLA CPU lowers a bf16 x bf16 -> bf16 dot, and a mixed-dtype one, to its float32 kernel
      (~0.19 TFLOP/s on a 2-core AVX512-BF16 machine) but bf16 x bf16 -> f32 to the native BF16 kernel (~0.39);
      rounding the float32 result gives the same values.
    - Backward: autodiff's transposed dots make XLA CPU copy the large activation gradient into a transposed
      layout for every weight gradient; the products written out in `_gradient_equations` avoid most of those
      copies (float32 SFT benchmark step 3.5 s -> 3.0 s) and stay bf16 x bf16 -> f32 in bfloat16.
    """
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _cpu_einsum_fwd(equation, x, w):
    return _cpu_einsum(equation, x, w), (x, w)


def _cpu_einsum_bwd(equation, residuals, g):
    x, w = residuals
    dx_eq, dw_eq = _gradient_equations(equation)
    g = g.astype(x.dtype)
    return _cpu_einsum(dx_eq, g, w), _cpu_einsum(dw_eq, x, g)


_cpu_einsum.defvjp(_cpu_einsum_fwd, _cpu_einsum_bwd)


def project(equation: str, x: jax.Array, kernel) -> jax.Array:
    """x through a projection: a plain `nnx.Param` kernel, or a kernel with low-rank adapters (models/lora.py)."""
    if isinstance(kernel, nnx.Variable):
        return matmul(equation, x, kernel[...])
    return kernel.project(equation, x)  # the adapter's extra x·A·B product needs x itself, not just a weight


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, axis_name: str = "norm"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * normed.astype(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Per-pair rotation frequencies, including Llama-3's long-context rescaling."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by positions [batch, length] (rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_weights_mask_value(dtype) -> float:
    # A finite minimum (not -inf) so fully-masked rows (padding queries) stay finite instead of NaN.
    return float(jnp.finfo(dtype).min)


def _attention_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     keys_transposed: bool = False) -> jax.Array:
    """Head-major attention: q [b, kv, groups, t, d], k/v [b, kv, s, d], mask [b, t, s] -> [b, kv, groups, t, d].

    keys_transposed: k is [b, kv, d, s] (the KV cache's layout).
    """
    b, kv, groups, t, d = q.shape
    s = v.shape[2]
    # Query heads of one KV group are stacked along the row axis so each score matmul is a plain
    # [rows, d] x [d, s] product per (batch, kv head): XLA CPU/GPU lower that to its fast GEMM path.
    equation = "bkqd,bkds->bkqs" if keys_transposed else "bkqd,bksd->bkqs"
    scores = jnp.einsum(equation, q.reshape(b, kv, groups * t, d), k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, groups, t, s) * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, attention_weights_mask_value(jnp.float32))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, groups * t, s)
    return matmul("bkqs,bksd->bkqd", probs, v).reshape(b, kv, groups, t, d)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, causal_block: int | None = None
) -> jax.Array:
    """Grouped-query attention.

    q: [b, t, h, d]; k, v: [b, s, kv, d]; mask: [b, t, s] (True = may attend). Returns [b, t, h, d].
    With `causal_block`, q and k must be the same positions and `mask` causal: query block i then only
    visits keys [0, end of block i), skipping the all-masked upper triangle (~40% less work at 512 tokens).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    # One transpose to head-major per call, not one per block: XLA CPU materialises each transpose.
    qh = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if not causal_block or t <= causal_block:
        out = _attention_block(qh, kh, vh, mask)
    else:
        if k.shape[1] != t:
            raise ValueError(f"causal_block needs aligned queries and keys, got {t} queries and {k.shape[1]} keys")
        blocks = []
        for start in range(0, t, causal_block):
            end = min(start + causal_block, t)
            blocks.append(_attention_block(qh[:, :, :, start:end], kh[:, :, :end], vh[:, :, :end],
                                           mask[:, start:end, :end]))
        out = jnp.concatenate(blocks, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int) -> jax.Array:
    """Training/scoring attention over aligned causal q/k, with a backward that keeps no [t, t] buffer.

    q: [b, t, h, d]; k, v: [b, t, kv, d]; mask: [b, t, t] (causal, True = may attend). Returns [b, t, h, d], the
    values of `dot_product_attention(..., causal_block=block)`. Query block i visits keys [0, end of block i).
    Why not autodiff of that: it saves every block's softmax for the backward, and under remat the whole layer's
    MLP backward ran with all of them alive (XLA CPU, Qwen2.5-3B, 8 rows x 2,048 per device: ~2.3 GB of f32
    probabilities beside the MLP's 2.9 GB). Here (flash-attention style) the forward saves only the output and
    each query's softmax max and denominator; the backward recomputes one block's probabilities at a time.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"causal_attention needs aligned queries and keys, got {t} queries and {k.shape[1]} keys")
    qh = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _causal_attention_heads(max(1, min(block, t)), qh, kh, vh, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _block_scores(qb: jax.Array, kb: jax.Array, mask_b: jax.Array) -> jax.Array:
    """Scaled, masked float32 scores [b, kv, groups, tb, s] of query block qb [b, kv, groups, tb, d] over kb."""
    b, kv, groups, tb, d = qb.shape
    s = kb.shape[2]
    scores = jnp.einsum("bkqd,bksd->bkqs", qb.reshape(b, kv, groups * tb, d), kb, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, groups, tb, s) * (1.0 / math.sqrt(d))
    return jnp.where(mask_b[:, None, None, :, :], scores, attention_weights_mask_value(jnp.float32))


def _grouped(x: jax.Array) -> jax.Array:
    """[b, kv, groups, tb, n] -> [b, kv, groups * tb, n]: one plain GEMM per (batch, kv head)."""
    b, kv, groups, tb, n = x.shape
    return x.reshape(b, kv, groups * tb, n)


def _after(x: jax.Array, previous: jax.Array | None) -> jax.Array:
    """x, made to depend on `previous` (x + 0 * one element of it), so this block's work waits for the last one's.

    Without it the query blocks are independent, and XLA CPU's scheduler ran their score products side by side:
    every block's [tb, s] buffers alive at once, no better than the autodiff version (measured: the gradient's
    temporaries at 512 tokens, blocks of 64, were 7.6 MB against autodiff's 9.6 MB; 0 * x is not folded away,
    as it is NaN for x = inf).
    """
    if previous is None:
        return x
    return x + (jnp.zeros((), previous.dtype) * previous.reshape(-1)[0]).astype(x.dtype)


def _causal_attention_forward(block, qh, kh, vh, mask):
    """(output, per-query score max, per-query softmax denominator): the softmax as jax.nn.softmax computes it."""
    outs, maxes, sums = [], [], []
    for start, end in _query_blocks(qh.shape[3], block):
        qb = _after(qh[:, :, :, start:end], outs[-1] if outs else None)
        scores = _block_scores(qb, kh[:, :, :end], mask[:, start:end, :end])
        # max and sum kept apart, not folded into one log-sum-exp: a fully masked (padding) query's scores are
        # all finfo.min, where max + log(sum) rounds back to max and its probabilities would not sum to 1
        top = jnp.max(scores, axis=-1)
        unnormalized = jnp.exp(scores - top[..., None])
        total = jnp.sum(unnormalized, axis=-1)
        probs = (unnormalized / total[..., None]).astype(vh.dtype)
        o = jnp.einsum("bkqs,bksd->bkqd", _grouped(probs), vh[:, :, :end], preferred_element_type=jnp.float32)
        outs.append(o.reshape(*probs.shape[:-1], -1).astype(qh.dtype))
        maxes.append(top)
        sums.append(total)
    return tuple(jnp.concatenate(x, axis=3) for x in (outs, maxes, sums))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _causal_attention_heads(block, qh, kh, vh, mask):
    """Head-major causal attention: qh [b, kv, groups, t, d], kh/vh [b, kv, t, d] -> [b, kv, groups, t, d]."""
    return _causal_attention_forward(block, qh, kh, vh, mask)[0]


def _causal_attention_fwd(block, qh, kh, vh, mask):
    out, top, total = _causal_attention_forward(block, qh, kh, vh, mask)
    return out, (qh, kh, vh, mask, out, top, total)


def _causal_attention_bwd(block, residuals, g):
    """Per query block: P = exp(S - max) / sum, dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = dS K, dK += dS^T Q."""
    qh, kh, vh, mask, out, top, total = residuals
    b, kv, groups, t, d = qh.shape
    scale = 1.0 / math.sqrt(d)
    # rowsum(dO * O) = sum_s P dP: the softmax Jacobian's diagonal correction, one number per query
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq_blocks = []
    dk = jnp.zeros((b, kv, t, d), jnp.float32)
    dv = jnp.zeros((b, kv, t, d), jnp.float32)
    for start, end in _query_blocks(t, block):
        previous = dq_blocks[-1] if dq_blocks else None
        qb, gb = _after(qh[:, :, :, start:end], previous), _after(g[:, :, :, start:end].astype(vh.dtype), previous)
        scores = _block_scores(qb, kh[:, :, :end], mask[:, start:end, :end])
        probs = jnp.exp(scores - top[..., start:end, None]) / total[..., start:end, None]
        dv_b = jnp.einsum("bkqs,bkqd->bksd", _grouped(probs.astype(vh.dtype)), _grouped(gb),
                          preferred_element_type=jnp.float32)
        dprobs = jnp.einsum("bkqd,bksd->bkqs", _grouped(gb), vh[:, :, :end], preferred_element_type=jnp.float32)
        dscores = probs * (dprobs.reshape(probs.shape) - delta[..., start:end, None]) * scale
        # masked scores are constants (jnp.where in _block_scores): no gradient, also in a fully masked row,
        # whose probabilities there are 1/s, not 0
        dscores = jnp.where(mask[:, None, None, start:end, :end], dscores, 0.0).astype(qh.dtype)
        dq = jnp.einsum("bkqs,bksd->bkqd", _grouped(dscores), kh[:, :, :end], preferred_element_type=jnp.float32)
        dq_blocks.append(dq.reshape(b, kv, groups, end - start, d))
        dk_b = jnp.einsum("bkqs,bkqd->bksd", _grouped(dscores), _grouped(qb), preferred_element_type=jnp.float32)
        pad = ((0, 0), (0, 0), (0, t - end), (0, 0))
        dk, dv = dk + jnp.pad(dk_b, pad), dv + jnp.pad(dv_b, pad)
    dq = jnp.concatenate(dq_blocks, axis=3)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_causal_attention_heads.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention over a KV cache: q [b, t, h, d], keys [b, kv, d, s], values [b, kv, s, d].

    Returns [b, t, h, d]. Only the (few) queries are transposed; each product reads the cache in place, once.
    """
    b, t, h, d = q.shape
    kv = k_cache.shape[1]
    qh = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    out = _attention_block(qh, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask, keys_transposed=True)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.initializer_range
        self.dtype = dtype
        self.q_proj = _param(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), param_dtype, std)
        self.k_proj = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, std)
        self.v_proj = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype, std)
        self.o_proj = _param(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), param_dtype, std)
        if cfg.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((h, d), param_dtype), logical_axes=("q_heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((kv, d), param_dtype), logical_axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((kv, d), param_dtype), logical_axes=("kv_heads", "head_dim"))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        # Plain Python values (not arrays) so NNX treats them as static; inv_freq constant-folds under jit.
        self.rope = (d, cfg.rope_theta, cfg.rope_scaling)

    def _project(self, x, kernel, bias, axes):
        y = project("bte,ehd->bthd", x.astype(self.dtype), kernel)
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return constrain(y, axes)

    def qkv(self, x: jax.Array, positions: jax.Array):
        q = self._project(x, self.q_proj, self.q_bias, ("batch", "length", "act_heads", "head_dim"))
        k = self._project(x, self.k_proj, self.k_bias, ("batch", "length", "act_kv_heads", "head_dim"))
        v = self._project(x, self.v_proj, self.v_bias, ("batch", "length", "act_kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inverse_frequencies(*self.rope)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def output(self, attn: jax.Array) -> jax.Array:
        y = project("bthd,hde->bte", attn.astype(self.dtype), self.o_proj)
        return constrain(y, ("batch", "length", "act_embed"))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, m, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.dtype = dtype
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), param_dtype, std)
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), param_dtype, std)
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), param_dtype, std)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = project("bte,em->btm", x, self.gate_proj)
        up = project("bte,em->btm", x, self.up_proj)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return constrain(project("btm,me->bte", hidden, self.down_proj), ("batch", "length", "act_embed"))
