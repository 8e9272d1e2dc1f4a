"""Student rollouts: the `RolloutBackend` interface (base.py) and its JetStream implementations.

`make_rollout_backend(config, model, tokenizer)` is importable from here without loading JetStream; the
engine is imported only when a backend is built.
"""

from __future__ import annotations

from typing import Any


def make_rollout_backend(config, model_or_params: Any, tokenizer):
    """The backend `config.rollout.backend` names (see stat_jax/rollout/factory.py)."""
    from stat_jax.rollout.factory import make_rollout_backend as make

    return make(config, model_or_params, tokenizer)
