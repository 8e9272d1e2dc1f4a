"""Test-wide setup: 8 fake CPU devices, offline, deterministic.

XLA reads XLA_FLAGS once, when jax initialises its backends, so this must run before anything imports jax.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import stat_jax  # noqa: E402,F401  (its XLA CPU defaults must be in XLA_FLAGS before jax starts a backend)
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def student(tmp_path_factory):
    """A tiny random Llama exported as a Hugging Face directory, with the offline char tokenizer (read-only)."""
    from stat_jax.data.char_tokenizer import build_char_tokenizer
    from stat_jax.models import export_hf_checkpoint, init_model
    from stat_jax.models.llama import tiny_llama

    path = tmp_path_factory.mktemp("student")
    tok = build_char_tokenizer()
    export_hf_checkpoint(init_model(tiny_llama(vocab_size=len(tok)), seed=0), path)
    tok.save_pretrained(str(path))
    return path
