"""`stat-jax serve --config=...`: JetStream's gRPC server for a student, bound to 127.0.0.1 by default.

The server is JetStream 0.2.2's `JetStreamServer` around stat-jax's `StatDriver`; clients (e.g.
`JetStreamClient`) send token ids. It writes `<workdir>/serve.json` (address, pid, settings) once listening,
and exits with status 1 when a driver thread fails instead of JetStream's SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import grpc

from stat_jax.rollout.driver import StatDriver
from stat_jax.rollout.engine import StudentEngine, js
from stat_jax.rollout.jetstream_compat import bind_host, jetstream_info

logger = logging.getLogger(__name__)


class RunningServer:
    """A started JetStream gRPC server and its driver."""

    def __init__(self, engine: StudentEngine, host: str, port: int, *, threads: int = 0,
                 truncate_long_prompts: bool = False):
        self.address = f"{host}:{port}"
        self.driver = StatDriver(engine, truncate_long_prompts=truncate_long_prompts)
        bind_host(host)
        threads = threads or max(engine.max_concurrent_decodes * 2, 16)
        try:
            self.server = js.server_lib.JetStreamServer(self.driver, threads, port,
                                                        grpc.insecure_server_credentials())
            self.server.start()
        except Exception as e:
            self.driver.stop()
            raise RuntimeError(f"could not serve on {self.address} ({e}); is the port in use? "
                               f"Change rollout.port or rollout.host") from e
        logger.info("JetStream serving on %s (%d slots)", self.address, engine.max_concurrent_decodes)

    def stop(self) -> None:
        """Stops the driver threads and the gRPC server (in-flight streams get 10 s grace)."""
        self.server.stop()


def serve_until_stopped(running: RunningServer, stop: threading.Event, poll_s: float = 0.5) -> int:
    """Blocks until `stop` is set (0) or a driver thread fails (1); the server is stopped either way."""
    try:
        while not stop.wait(poll_s):
            failed = running.driver.failure()
            if failed is not None:
                logger.error("JetStream %s thread failed: %r; shutting the server down", failed.name, failed.error)
                return 1
        return 0
    finally:
        running.stop()


def main(config, args) -> int:
    """Loads the student from config.model, serves it until SIGINT/SIGTERM."""
    from stat_jax.models.student import load_model, load_tokenizer
    from stat_jax.rollout.factory import build_engine

    r = config.rollout
    engine = build_engine(config, load_model(config), load_tokenizer(config))
    running = RunningServer(engine, r.host, int(r.port), threads=int(r.server_threads),
                            truncate_long_prompts=bool(r.truncate_long_prompts))
    manifest = {"address": running.address, "pid": os.getpid(), "model": str(config.model.path),
                "max_concurrent_decodes": engine.max_concurrent_decodes,
                "max_prefill_length": engine.settings.max_prefill_length,
                "max_target_length": engine.settings.max_target_length, **jetstream_info()}
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    (Path(config.workdir) / "serve.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.time()
    code = serve_until_stopped(running, stop)
    logger.info("server on %s stopped after %.0fs (exit %d)", running.address, time.time() - started, code)
    return code
