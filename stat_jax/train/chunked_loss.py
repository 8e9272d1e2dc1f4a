"""Per-token log-probs (and entropy) from final hidden states without the whole [tokens, vocab] logits at once.

The float32 logits of a batch are the largest activation of a small-model step (8 x 2,048 tokens of a
151,936-word vocabulary: ~10 GB, and as much again for their gradient). Here the sequence is cut into chunks of
`chunk_length` positions; a `lax.scan` computes each chunk's logits from `model.logits_from_hidden`, reduces
them to per-token numbers at once, and `jax.checkpoint` makes the backward pass recompute that chunk's logits
instead of saving them. So at most one chunk's logits (and their cotangent) exist, forward or backward, and
the values equal the unchunked computation: each token's numbers come from the same row of the same product.

Both trainers use it: SFT's cross entropy is `-logp`; GRPO's log-probs are of logits / temperature, and its
entropy metric is computed from the same chunk (under stop_gradient, so it costs no backward work).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# rows x positions of float32 logits alive at once (train/grpo.loss_chunk_tokens' default; see configs/base.py).
DEFAULT_CHUNK_TOKENS = 2048


def chunk_length(rows: int, length: int, chunk_tokens: int) -> int:
    """Positions per chunk so that rows x positions <= chunk_tokens (at least 1); `length` = 0 chunks disables."""
    if chunk_tokens <= 0:
        return length
    return max(1, min(length, chunk_tokens // max(rows, 1)))


def stats_from_logits(logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0,
                      entropy: bool = False) -> dict[str, jax.Array]:
    """{"logp": log p(target) [..., t]} (+ "entropy", no gradient) of softmax(logits / temperature), in float32."""
    z = logits.astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    out = {"logp": jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - lse}
    if entropy:
        z = jax.lax.stop_gradient(z)
        lse = jax.lax.stop_gradient(lse)
        # H = -sum p log p = lse - sum p z, with p = exp(z - lse): one pass over the chunk, no log_softmax copy.
        out["entropy"] = lse - jnp.sum(jnp.exp(z - lse[..., None]) * z, axis=-1)
    return out


def token_stats(model, hidden: jax.Array, targets: jax.Array, *, chunk_tokens: int, temperature: float = 1.0,
                entropy: bool = False) -> dict[str, jax.Array]:
    """Per-token {"logp"[, "entropy"]} [b, t] from final hidden states [b, t, e], chunked over the sequence.

    model: anything with `logits_from_hidden(h [b, c, e]) -> logits [b, c, V]` (a DecoderLM; tied or untied
    head). chunk_tokens: rows x positions whose logits may exist at once; <= 0 or >= b*t computes all at once.
    """
    b, t, _ = hidden.shape
    length = chunk_length(b, t, chunk_tokens)

    def chunk(h, y):
        return stats_from_logits(model.logits_from_hidden(h, vocab_parallel=True), y, temperature=temperature,
                                 entropy=entropy)

    if length >= t:
        return chunk(hidden, targets)
    n = math.ceil(t / length)
    pad = n * length - t  # padded positions get target 0 and are cut off below; the caller's weights are 0 there
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))) if pad else hidden
    y = jnp.pad(targets, ((0, 0), (0, pad))) if pad else targets
    # [n, b, length, ...]: each chunk keeps every row, so a batch-sharded step stays batch-sharded per chunk.
    h = h.reshape(b, n, length, h.shape[-1]).swapaxes(0, 1)
    y = y.reshape(b, n, length).swapaxes(0, 1)
    # prevent_cse=False: inside scan the recomputation cannot be merged away anyway (jax.checkpoint docs).
    body = jax.checkpoint(chunk, prevent_cse=False)
    _, out = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, (h, y))
    return jax.tree.map(lambda v: v.swapaxes(0, 1).reshape(b, n * length)[:, :t], out)
