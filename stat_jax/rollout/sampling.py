"""Token sampling for the rollout engine: greedy, temperature, top-k, top-p, with per-row settings.

Settings are arrays, not static arguments, so changing them between calls never recompiles. Row b's key for
its m-th generated token is fold_in(request_key_b, m - 1), and request_key depends only on
(seed, prompt index, sample index): a sample is the same whichever slot or batch it runs in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def request_key(seed: jax.Array, prompt_index: jax.Array, sample_index: jax.Array) -> jax.Array:
    """The raw uint32[2] key of one request."""
    key = jax.random.PRNGKey(seed)
    return jax.random.fold_in(jax.random.fold_in(key, prompt_index), sample_index)


def step_keys(request_keys: jax.Array, token_index: jax.Array) -> jax.Array:
    """Keys [b, 2] for the token_index-th (0-based) generated token of each row."""
    return jax.vmap(jax.random.fold_in)(request_keys, token_index)


def _filtered_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Logits / temperature with everything outside the top-k and the top-p nucleus set to -inf."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)[None, :]
    in_top_k = ranks < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    # A token is in the nucleus if the mass strictly before it is below top_p (so the top token always is).
    in_nucleus = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) & in_top_k
    num_kept = jnp.maximum(jnp.sum(in_nucleus, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Next tokens [b] from logits [b, V], and each token's log-probability [b] (float32) under the distribution
    it was drawn from: temperature, top-k and top-p applied, renormalised over the kept tokens. Rows with
    temperature 0 take the argmax, whose log-probability under greedy decoding is 0."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        filtered = _filtered_logits(logits, temperature, top_p, top_k)
        tokens = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
        return tokens, logp

    # An all-greedy batch (eval) skips the vocabulary sort and the log-probabilities entirely.
    drawn, logp = jax.lax.cond(jnp.all(temperature <= 0), lambda: (greedy, jnp.zeros(greedy.shape, jnp.float32)),
                               sampled)
    return jnp.where(temperature > 0, drawn, greedy), jnp.where(temperature > 0, logp, 0.0)
