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
# The suite builds the same small programs many times over (fresh jit closures per test, CLI subprocesses, resumed
# runs); XLA's persistent cache is keyed by the program, so each distinct one compiles once per suite run (26% less
# CPU time in tests/train/test_sft.py). The size cap switches on jax's file lock, which two processes sharing the
# cache (the multi-process tests) need. Subprocesses inherit all three through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="stat-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

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
