"""Makes google-jetstream 0.2.2 (the newest on PyPI) importable and safe to embed with current jax.

Import JetStream only through `load_jetstream()`; it applies, once and before JetStream's modules load:
- a minimal `seqio.vocabularies` module when seqio is absent (0.2.2's `engine_api` imports it for type names
  only; seqio would pull TensorFlow, ~3.2 GB). Only the SentencePiece tokenizer path needs real seqio.
- `jax.tree_map = jax.tree.map` (removed from jax; the orchestrator still calls it).
- undoes the orchestrator's import-time side effect (root logger set to DEBUG with a stdout handler) and
  filters its per-step INFO records out of the root logger, so `--log-level=INFO` stays readable.
- replaces `JetThread.run`, which SIGKILLs the whole process when any driver thread raises, with one that
  records the exception on the thread; `thread_failure(threads)` surfaces it so callers raise `RolloutError`.
`bind_host(host)` sets the address JetStream's gRPC server binds (hard-coded "[::]" in 0.2.2).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import traceback
import types
from typing import Any

logger = logging.getLogger(__name__)

JETSTREAM_VERSION = "0.2.2"
_lock = threading.Lock()
_loaded: types.SimpleNamespace | None = None


def _install_seqio_vocabularies() -> None:
    """Registers a `seqio.vocabularies` with the two names JetStream imports, unless seqio is installed."""
    if "seqio" in sys.modules or importlib.util.find_spec("seqio") is not None:
        return

    class Vocabulary:
        """Type stand-in: stat-jax tokenizes with Hugging Face tokenizers, never through seqio."""

        def __init__(self, *args, **kwargs):
            raise ImportError(
                "JetStream's seqio/SentencePiece tokenizer was requested but seqio is not installed; stat-jax "
                "engines use Hugging Face tokenizers (stat_jax.rollout.engine.HFTokenizer). Install seqio only "
                "if you run JetStream's own SentencePiece engines."
            )

    class SentencePieceVocabulary(Vocabulary):
        pass

    vocabularies = types.ModuleType("seqio.vocabularies")
    vocabularies.Vocabulary = Vocabulary
    vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
    vocabularies.__doc__ = "stat-jax stand-in for seqio.vocabularies (see stat_jax/rollout/jetstream_compat.py)."
    seqio = types.ModuleType("seqio")
    seqio.vocabularies = vocabularies
    seqio.__doc__ = vocabularies.__doc__
    sys.modules["seqio"] = seqio
    sys.modules["seqio.vocabularies"] = vocabularies


def _alias_tree_map() -> None:
    import jax

    try:
        jax.tree_map  # noqa: B018 -- removed in jax >= 0.6; accessing raises AttributeError
    except AttributeError:
        jax.tree_map = jax.tree.map


class _DropJetStreamInfo(logging.Filter):
    """Drops JetStream's records below WARNING (it logs several INFO lines per decode step via the root logger)."""

    def __init__(self, package_dir: str):
        super().__init__()
        self._package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._package_dir)


def _import_orchestrator_quietly():
    """Imports the orchestrator, then restores the root logger it reconfigures at import time."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from jetstream.core import orchestrator

    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    if os.environ.get("STAT_JAX_JETSTREAM_LOGS", "") != "1":
        root.addFilter(_DropJetStreamInfo(os.path.dirname(os.path.dirname(orchestrator.__file__))))
    return orchestrator


def _run_recording_errors(self: threading.Thread) -> None:
    """JetThread.run without the SIGKILL: the exception is kept on the thread for the owner to raise."""
    try:
        threading.Thread.run(self)
    except BaseException as e:  # noqa: BLE001 -- everything must reach the caller, nothing may kill the process
        self.error = e
        self.error_traceback = traceback.format_exc()
        logger.error("JetStream thread %s failed: %r\n%s", self.name, e, self.error_traceback)


def thread_failure(threads) -> threading.Thread | None:
    """The first thread among `threads` that died with an exception, if any."""
    for t in threads:
        if getattr(t, "error", None) is not None:
            return t
    return None


def load_jetstream() -> types.SimpleNamespace:
    """Applies the compatibility fixes once and returns JetStream's modules as a namespace."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        _install_seqio_vocabularies()
        _alias_tree_map()
        try:
            orchestrator = _import_orchestrator_quietly()
            from jetstream.core import server_lib
            from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
            from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2
        except ImportError as e:
            raise ImportError(
                f"JetStream {JETSTREAM_VERSION} could not be imported ({e}). Install it with "
                "`bash third_party/install_jetstream.sh .venv/bin/python` (see third_party/README.md)."
            ) from e
        orchestrator.JetThread.run = _run_recording_errors
        _loaded = types.SimpleNamespace(
            orchestrator=orchestrator, server_lib=server_lib, engine_api=engine_api, token_utils=token_utils,
            tokenizer_api=tokenizer_api, tokenizer_pb2=tokenizer_pb2, jetstream_pb2=jetstream_pb2,
            jetstream_pb2_grpc=jetstream_pb2_grpc,
        )
        return _loaded


def bind_host(host: str) -> None:
    """Makes JetStream's gRPC server bind `host` (0.2.2 hard-codes "[::]", every interface)."""
    js = load_jetstream()
    js.server_lib._HOST = f"[{host}]" if ":" in host and not host.startswith("[") else host


def jetstream_info() -> dict[str, Any]:
    """Version facts for run manifests and benchmark JSON."""
    from importlib import metadata

    return {"google-jetstream": metadata.version("google-jetstream"),
            "seqio": "stand-in" if getattr(sys.modules.get("seqio"), "__file__", None) is None else "installed"}
