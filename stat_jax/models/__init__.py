"""Flax NNX Llama / Qwen students and Hugging Face checkpoint conversion."""

from stat_jax.models.build import abstract_model, as_dtype, init_model, param_count
from stat_jax.models.checkpoint import (
    CheckpointError,
    copy_tokenizer_files,
    export_hf_checkpoint,
    load_hf_checkpoint,
)
from stat_jax.models.config import ModelConfig, RopeScaling, UnsupportedModelError
from stat_jax.models.transformer import DecoderLM, KVCache

__all__ = [
    "CheckpointError", "DecoderLM", "KVCache", "ModelConfig", "RopeScaling", "UnsupportedModelError",
    "abstract_model", "as_dtype", "copy_tokenizer_files", "export_hf_checkpoint", "init_model",
    "load_hf_checkpoint", "param_count",
]
