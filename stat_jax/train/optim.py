"""The optimizer shared by the SFT and GRPO trainers: AdamW, warmup then cosine/linear decay, global-norm clipping.

`build_optimizer(config.train, total_steps)` reads these fields of a config section (any object with
attributes or a mapping): learning_rate, lr_schedule ("cosine" | "linear" | "constant"), warmup_steps,
warmup_ratio (used when warmup_steps is 0), min_lr_ratio, weight_decay, b1, b2, eps, max_grad_norm (0 = off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def _get(section: Any, key: str, default: Any) -> Any:
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


def warmup_steps_for(train_cfg: Any, total_steps: int) -> int:
    """warmup_steps if set, else round(warmup_ratio * total_steps); never more than total_steps."""
    warmup = int(_get(train_cfg, "warmup_steps", 0))
    if warmup <= 0:
        warmup = int(round(float(_get(train_cfg, "warmup_ratio", 0.0)) * total_steps))
    return max(0, min(warmup, total_steps))


def learning_rate_schedule(train_cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then `lr_schedule` down to min_lr_ratio * learning_rate."""
    peak = float(_get(train_cfg, "learning_rate", 1e-5))
    kind = str(_get(train_cfg, "lr_schedule", "cosine"))
    if kind not in SCHEDULES:
        raise ValueError(f"train.lr_schedule={kind!r}: choose one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"learning_rate_schedule: total_steps must be positive, got {total_steps}")
    end = peak * float(_get(train_cfg, "min_lr_ratio", 0.0))
    warmup = warmup_steps_for(train_cfg, total_steps)
    decay_steps = max(1, total_steps - warmup)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay only on matrices: norms and biases (ndim < 2) are not decayed (the usual LLM recipe)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(train_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) for `total_steps` optimizer updates."""
    schedule = learning_rate_schedule(train_cfg, total_steps)
    parts = []
    clip = float(_get(train_cfg, "max_grad_norm", 1.0))
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(_get(train_cfg, "b1", 0.9)),
            b2=float(_get(train_cfg, "b2", 0.95)),
            eps=float(_get(train_cfg, "eps", 1e-8)),
            weight_decay=float(_get(train_cfg, "weight_decay", 0.0)),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, replicated: Any) -> Any:
    """Shardings of `tx.init(params)`: moments follow their parameter's sharding; counters are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract, param_shardings, transform_non_params=lambda _: replicated
    )
