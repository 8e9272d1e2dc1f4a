"""Building rollout backends and engines from `config.rollout` (see configs/base.py)."""

from __future__ import annotations

from typing import Any

from flax import nnx

from stat_jax.data.stop_tokens import stop_token_ids
from stat_jax.models.transformer import DecoderLM
from stat_jax.rollout.base import RolloutBackend, SamplingParams
from stat_jax.rollout.engine import EngineSettings, HFTokenizer, StudentEngine

BACKENDS = ("jetstream", "client")


def engine_settings(rollout_cfg) -> EngineSettings:
    return EngineSettings(max_concurrent_decodes=int(rollout_cfg.max_concurrent_decodes),
                          max_prefill_length=int(rollout_cfg.max_prefill_length),
                          max_target_length=int(rollout_cfg.max_target_length),
                          cache_dtype=str(rollout_cfg.cache_dtype),
                          cache_memory_fraction=float(rollout_cfg.cache_memory_fraction),
                          prefill_batch_tokens=int(rollout_cfg.prefill_batch_tokens))


def default_sampling(rollout_cfg) -> SamplingParams:
    """Sampling for requests that carry none (plain JetStream clients of `stat-jax serve`)."""
    return SamplingParams(temperature=float(rollout_cfg.temperature), top_p=float(rollout_cfg.top_p),
                          top_k=int(rollout_cfg.top_k), seed=int(rollout_cfg.seed))


def as_model(model_or_params: Any) -> DecoderLM:
    """A DecoderLM from itself or from its `nnx.split` pair (graphdef, state)."""
    if isinstance(model_or_params, DecoderLM):
        return model_or_params
    if isinstance(model_or_params, tuple) and len(model_or_params) == 2:
        return nnx.merge(*model_or_params)
    raise TypeError(f"make_rollout_backend needs a DecoderLM or (graphdef, state), got {type(model_or_params)!r}; "
                    "bare params carry no architecture (call backend.update_params(params) to swap weights)")


def build_engine(config, model: DecoderLM, tokenizer) -> StudentEngine:
    r = config.rollout
    stops = stop_token_ids(tokenizer, model.config.eos_token_ids)  # EOS ids + the template's end of turn
    return StudentEngine(model, HFTokenizer(tokenizer, stops), engine_settings(r),
                         default_sampling(r))


def make_rollout_backend(config, model_or_params: Any, tokenizer) -> RolloutBackend:
    """The backend `config.rollout.backend` names: in-process JetStream, or a client of `stat-jax serve`."""
    r = config.rollout
    if r.backend == "jetstream":
        from stat_jax.rollout.inprocess import JetStreamBackend

        model = as_model(model_or_params)
        return JetStreamBackend(model, tokenizer, engine_settings(r),
                                truncate_long_prompts=bool(r.truncate_long_prompts))
    if r.backend == "client":
        from stat_jax.rollout.client import JetStreamClient

        if not r.address:
            raise ValueError("rollout.backend=client needs --config.rollout.address=HOST:PORT of `stat-jax serve`")
        return JetStreamClient(r.address, tokenizer, max_workers=int(r.client_max_workers),
                               retries=int(r.client_retries), backoff_s=float(r.client_backoff_s),
                               timeout_s=float(r.client_timeout_s))
    raise ValueError(f"rollout.backend={r.backend!r} is not one of {BACKENDS}")
