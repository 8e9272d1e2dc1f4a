"""Creating models: abstract (shapes only), randomly initialised directly onto a mesh, split/merge helpers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from stat_jax import sharding
from stat_jax.models.config import ModelConfig
from stat_jax.models.transformer import DecoderLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def abstract_model(cfg: ModelConfig, *, dtype="float32", param_dtype="float32", remat=False,
                   attention_block: int | None = None) -> DecoderLM:
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(
        lambda: DecoderLM(cfg, dtype=as_dtype(dtype), param_dtype=as_dtype(param_dtype), remat=remat,
                          attention_block=attention_block, rngs=nnx.Rngs(0))
    )


def init_model(
    cfg: ModelConfig,
    mesh: Mesh | None = None,
    *,
    seed: int = 0,
    dtype="float32",
    param_dtype="float32",
    remat: bool = False,
    attention_block: int | None = None,
) -> DecoderLM:
    """A randomly initialised model; with a mesh, every parameter is created already sharded."""
    dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)

    def make():
        return DecoderLM(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_block=attention_block,
                         rngs=nnx.Rngs(seed))

    if mesh is None:
        return make()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract_state, mesh)

    def create():
        return nnx.split(make())[1]

    state = jax.jit(create, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def param_count(model_or_state) -> int:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
