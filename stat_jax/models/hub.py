"""Resolving a model reference: a local HF checkpoint directory, or a hub name downloaded once."""

from __future__ import annotations

import os
from pathlib import Path

from stat_jax.errors import ConfigError, ModelNotFoundError

_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve_model_path(name_or_path: str) -> Path:
    """Returns a local directory holding config.json + safetensors (+ tokenizer files)."""
    if not name_or_path:
        raise ConfigError("model.path is empty: pass --config.model.path=/path/to/hf_checkpoint (or a hub name)")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; model.path must be an HF checkpoint directory")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFoundError(f"model directory {path} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(
            f"{name_or_path!r} is not a local directory and HF_HUB_OFFLINE=1: download it first "
            f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and pass --config.model.path=DIR"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_PATTERNS))
    except Exception as e:  # network down, unknown repo, gated model
        raise ModelNotFoundError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            f"download it on a machine with access and pass --config.model.path=/local/dir"
        ) from e
