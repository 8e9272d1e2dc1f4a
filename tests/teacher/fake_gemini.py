"""A fake Gemini REST server on 127.0.0.1 for tests: the real google-genai client talks to it over HTTP.

It implements `POST /{version}/models/{model}:generateContent` (what `client.models.generate_content` calls),
checks the `x-goog-api-key` header like the real service (400 API_KEY_INVALID), answers through a scripted
function of the request body, and injects faults from a queue: "429", "500", "timeout" (answers after the
client's timeout), "malformed" (a text that is not JSON).
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^:/]+):generateContent$")
TASK = re.compile(r"\[stat-jax teacher prompt [^:]+: (\w+)\]")


def prompt_of(body: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []))


def task_of(body: dict[str, Any]) -> str:
    m = TASK.search(prompt_of(body))
    return m.group(1) if m else ""


class FakeGemini:
    """Start with `with FakeGemini(answer) as fake:`; `fake.base_url` goes into HttpOptions(base_url=...)."""

    def __init__(self, answer: Callable[[dict[str, Any]], Any], *, api_key: str = "test-key-123",
                 timeout_sleep_s: float = 1.0):
        self.answer = answer
        self.api_key = api_key
        self.timeout_sleep_s = timeout_sleep_s
        self.faults: collections.deque[str] = collections.deque()
        self.requests: list[dict[str, Any]] = []  # every request received (including faulted ones)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                m = PATH.match(self.path.split("?")[0])
                if m is None:
                    return self._send(404, {"error": {"code": 404, "message": f"no route {self.path}",
                                                      "status": "NOT_FOUND"}})
                with fake.lock:
                    fake.requests.append({"model": m["model"], "body": body, "task": task_of(body),
                                          "key": self.headers.get("x-goog-api-key")})
                    fault = fake.faults.popleft() if fake.faults else None
                if self.headers.get("x-goog-api-key") != fake.api_key:
                    return self._send(400, {"error": {
                        "code": 400, "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT",
                        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}})
                if fault == "429":
                    return self._send(429, {"error": {"code": 429, "message": "Resource has been exhausted",
                                                      "status": "RESOURCE_EXHAUSTED"}})
                if fault == "500":
                    return self._send(500, {"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}})
                if fault == "timeout":
                    time.sleep(fake.timeout_sleep_s)
                text = "this is {not json" if fault == "malformed" else json.dumps(fake.answer(body))
                prompt_tokens = len(prompt_of(body)) // 4 + 1
                self._send(200, {
                    "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                                    "index": 0}],
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": len(text) // 4 + 1,
                                      "totalTokenCount": prompt_tokens + len(text) // 4 + 1},
                    "modelVersion": m["model"]})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, task: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if task is None or r["task"] == task)

    def __enter__(self) -> FakeGemini:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
