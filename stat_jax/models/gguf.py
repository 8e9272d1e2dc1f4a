"""GGUF -> Hugging Face checkpoint directory (`stat-jax import-gguf FILE OUT_DIR`).

transformers reads a GGUF file (dequantising it to float) but refuses to `save_pretrained` a model loaded that
way, so the dequantised state dict is moved into a plain model of the same config and saved from there: the
result is an ordinary safetensors directory that every stat-jax loader (and transformers, vLLM, ...) reads.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from stat_jax.errors import ModelError

logger = logging.getLogger(__name__)


class GGUFImportError(ModelError, ValueError):
    """The GGUF file cannot be turned into an HF directory (missing, unreadable, unsupported architecture)."""

    hint = "pass an existing GGUF file of a Llama/Qwen model and a new (or empty) OUT_DIR"


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Writes config.json, model.safetensors, the tokenizer and generation_config.json to `out_dir`.

    Written to a sibling temporary directory first and renamed at the end, so an interrupted import never
    leaves a directory that looks complete.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise GGUFImportError(f"GGUF file {gguf_path} does not exist")
    if (out_dir / "config.json").exists():
        raise GGUFImportError(f"{out_dir} already holds a checkpoint (config.json); remove it or pick another OUT_DIR")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import torch
        import transformers
    except ImportError as e:
        raise GGUFImportError(f"importing GGUF needs the `gguf` and `torch` packages ({e}); "
                              "`pip install gguf torch accelerate`") from e

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # unsupported architecture, truncated file, ...
        raise GGUFImportError(f"transformers could not read {gguf_path}: {type(e).__name__}: {e}") from e

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are dequantised floats
    config.dtype = dtype
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the checkpoint unreadable to other users
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "IMPORTED_FROM.json").write_text(json.dumps(
            {"gguf_file": str(gguf_path.resolve()), "bytes": gguf_path.stat().st_size, "dtype": dtype}, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # only an empty directory gets here (config.json was checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("imported %s -> %s (%s, %d parameters)", gguf_path, out_dir, config.model_type,
                sum(p.numel() for p in plain.parameters()))
    return out_dir
