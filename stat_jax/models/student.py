"""The student a config names (`config.model`), loaded one way everywhere: its resolved directory, its tokenizer,
and its weights on `config.mesh` in `config.model`'s dtypes."""

from __future__ import annotations

from pathlib import Path

from stat_jax.errors import ConfigError


def student_path(config, path: str | Path | None = None) -> Path:
    """The local checkpoint directory of `path`, else of config.model.path (a hub name is downloaded once)."""
    from stat_jax.models.hub import resolve_model_path

    ref = str(path) if path is not None else config.model.path
    if not ref:
        raise ConfigError("this needs a student and model.path is empty",
                          hint="pass --config.model.path=DIR (a Hugging Face checkpoint directory)")
    return resolve_model_path(ref)


def load_tokenizer(config, path: str | Path | None = None):
    """The student's HF tokenizer: config.model.tokenizer_path when set, else the checkpoint's own."""
    import transformers

    tok = config.model.tokenizer_path if path is None and config.model.tokenizer_path else None
    return transformers.AutoTokenizer.from_pretrained(str(tok or student_path(config, path)))


def load_model(config, path: str | Path | None = None, mesh=None):
    """The checkpoint at `path` (default config.model.path) as a DecoderLM on `mesh` (default config.mesh)."""
    from stat_jax import sharding
    from stat_jax.models.checkpoint import load_hf_checkpoint

    mesh = mesh if mesh is not None else sharding.mesh_from_config(config.mesh)
    return load_hf_checkpoint(student_path(config, path), mesh, dtype=config.model.dtype,
                              param_dtype=config.model.param_dtype)
