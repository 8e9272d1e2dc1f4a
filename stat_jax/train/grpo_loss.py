"""GRPO's pieces as pure functions: group advantages, per-token log-probs, the clipped objective, k3 KL, the
rollout engine's importance-sampling correction.

Shapes: completions are rows of a [rows, t] batch; `mask` [rows, t] marks completion tokens (the prompt and
padding are 0). Rows come in groups of G samples of the same prompt, consecutive. The trainer
(`stat_jax.train.grpo`) builds its loss from `per_token_terms`, so what the tests check here is what it trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOG_RATIO_CLAMP = 20.0  # keeps exp() finite when a token's probability moved by many orders of magnitude


def group_advantages(rewards: np.ndarray, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> np.ndarray:
    """Per-sample advantage: reward minus its group's mean, optionally divided by the group's std.

    Default scale_by_std=True is GRPO as published (DeepSeekMath) and Tunix's default; False is the
    Dr. GRPO variant, which avoids up-weighting groups whose rewards barely differ (a difficulty bias).
    The std is the sample std (ddof=1). A group with identical rewards gets advantage 0 either way.
    """
    rewards = np.asarray(rewards, np.float64)
    if group_size < 1 or rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale_by_std and group_size > 1:
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(rewards.shape).astype(np.float32)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) [rows, t] in float32 from logits [rows, t, V]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - policy.

    Unbiased for samples drawn from the policy, never negative, and exactly 0 where policy == reference.
    """
    d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.exp(d) - d - 1.0


# ----- the rollout engine's distribution vs the trainer's ---------------------------------------------------
# The trainer's gradient assumes the completions were drawn from the distribution it computes. The engine
# samples from its own (bfloat16 weights over float32 masters, adapters merged into a quantized base, another
# kernel), so each token's ratio r = p_trainer / p_engine at the rollout's params reweights the update. Each
# correction maps (log r [rows, t], known [rows, t], cap) to stop-gradient weights on the per-token loss, and the
# tokens it capped or masked.
def _no_correction(log_r, known, cap):
    return jnp.ones_like(log_r), jnp.zeros_like(log_r)


def _token_tis(log_r, known, cap):
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"; TRL's token_truncate, Tunix's sampler_is="token"): weight min(r, cap) per token."""
    ratio = jnp.exp(jnp.clip(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return jnp.where(known, jnp.minimum(ratio, cap), 1.0), (known & (ratio > cap)).astype(jnp.float32)


def _sequence_mask(log_r, known, cap):
    """Masked importance sampling over whole answers (TRL's sequence_mask): an answer whose sequence ratio
    prod_t r_t exceeds the cap is left out of the update; the others keep weight 1."""
    dropped = jnp.sum(jnp.where(known, log_r, 0.0), axis=-1, keepdims=True) > jnp.log(cap)
    weights = jnp.where(dropped, 0.0, 1.0) * jnp.ones_like(log_r)
    return weights, (known & dropped).astype(jnp.float32)


ROLLOUT_CORRECTIONS = {"none": _no_correction, "token_tis": _token_tis, "sequence_mask": _sequence_mask}


def rollout_correction(trainer_logp: jax.Array, engine_logp: jax.Array, known: jax.Array, mode: str,
                       cap: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token loss weights [rows, t] (no gradient) correcting for the engine's sampling distribution, and
    per-token diagnostics: `abs_log_ratio` |log p_trainer - log p_engine|, `kl` (k3 estimate of
    KL(engine || trainer): the samples are the engine's), `capped` (1 where the correction capped or masked).

    `trainer_logp`: the trainer's log-probs at the params the engine sampled with; `known`: where the engine
    reported a log-prob (tokens it sampled; 0 for padding, the prompt, a stop token it did not report).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"grpo.rollout_correction={mode!r}: choose one of {sorted(ROLLOUT_CORRECTIONS)}")
    trainer_logp, known = jax.lax.stop_gradient(trainer_logp), known.astype(bool)
    log_r = jnp.where(known, trainer_logp - engine_logp, 0.0)
    weights, capped = ROLLOUT_CORRECTIONS[mode](log_r, known, float(cap))
    terms = {"abs_log_ratio": jnp.abs(log_r), "kl": jnp.where(known, k3_kl(engine_logp, trainer_logp), 0.0),
             "capped": capped}
    return jax.lax.stop_gradient(weights), terms


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """'token': mean over every completion token of the batch; 'sequence': mean over rows of each row's token mean.

    'token' (the default) weighs every generated token equally, so a long answer's tokens are not
    down-weighted relative to a short one's (DAPO / Dr. GRPO); 'sequence' is the original GRPO form.
    """
    mask = mask.astype(jnp.float32)
    if mode == "token":
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if mode == "sequence":
        per_row = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        has_tokens = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
        return jnp.sum(per_row * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    raise ValueError(f"loss aggregation {mode!r} is not 'token' or 'sequence'")


def per_token_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token loss [rows, t] = -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta k3, and per-token diagnostics.

    advantages: [rows] (one per completion, broadcast over its tokens). Diagnostics: `clipped` (1 where the
    clip removed the token's gradient) and, when a reference is used, `kl`.
    """
    ratio = jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)
    # min() picks the clipped branch exactly when A > 0 and r > 1+eps_high, or A < 0 and r < 1-eps_low.
    terms = {"clipped": (clipped < unclipped).astype(jnp.float32)}
    if ref_logp is not None and beta:
        terms["kl"] = k3_kl(logp, ref_logp)
        per_token = per_token + beta * terms["kl"]
    return per_token, terms


def grpo_objective(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logp: jax.Array | None = None,
    beta: float = 0.0,
    aggregation: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped importance-ratio loss (to minimise) plus beta * k3 KL, aggregated; returns (loss, metrics)."""
    per_token, terms = per_token_terms(logp, old_logp, advantages, epsilon_low=epsilon_low,
                                       epsilon_high=epsilon_high, ref_logp=ref_logp, beta=beta)
    loss = aggregate(per_token, mask, aggregation)
    m = mask.astype(jnp.float32)
    metrics = {"loss": loss, "clip_fraction": jnp.sum(terms["clipped"] * m) / jnp.maximum(jnp.sum(m), 1.0)}
    if "kl" in terms:
        metrics["kl"] = jnp.sum(terms["kl"] * m) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, metrics
