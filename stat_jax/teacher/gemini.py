"""The Gemini teacher on the official `google-genai` client, with structured JSON output.

Credentials come from the environment (GEMINI_API_KEY, then GOOGLE_API_KEY, or the variable named by
`teacher.api_key_env`) or from Vertex AI settings (project/location with application-default credentials);
they are never stored in the config, the cache, the ledger or any message. The client's own retries are
switched off: `TeacherClient` owns retries, so every attempt is counted in the ledger and the budget.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from stat_jax.teacher.base import RetryableTeacherError, TeacherBackend, TeacherError, TeacherRequest, TeacherResponse

log = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})


def _transport_errors(name: str) -> tuple[type[BaseException], ...]:
    """`name` (TimeoutException / TransportError) from httpx2 and httpx, whichever the client installed."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TIMEOUTS = _transport_errors("TimeoutException")
_TRANSPORT = _transport_errors("TransportError")


class TeacherAuthError(TeacherError):
    """The provider rejected the credentials; retrying cannot help."""


def find_api_key(env_var: str = "") -> tuple[str, str]:
    """(key, the variable it came from); raises TeacherAuthError naming the variables to set."""
    names = (env_var,) if env_var else API_KEY_ENV_VARS
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    raise TeacherAuthError(
        f"no Gemini API key: set {' or '.join(names)} in the environment (or use Vertex AI with "
        "--config.teacher.vertexai=true --config.teacher.project=... --config.teacher.location=...)")


class GeminiTeacher(TeacherBackend):
    """`TeacherBackend` calling `models.generate_content` with `response_json_schema` set to the request schema."""

    def __init__(self, model: str, *, api_key: str | None = None, api_key_env: str = "", base_url: str = "",
                 vertexai: bool = False, project: str = "", location: str = "", timeout_s: float = 120.0,
                 max_output_tokens: int = 0, max_output_tokens_by_task: dict[str, int] | None = None,
                 thinking_budget_by_task: dict[str, int] | None = None):
        if not model:
            raise TeacherError("teacher.model is empty: name a Gemini model, e.g. gemini-2.5-flash")
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.max_output_tokens_by_task = {k: int(v) for k, v in (max_output_tokens_by_task or {}).items()}
        self.thinking_budget_by_task = {k: int(v) for k, v in (thinking_budget_by_task or {}).items()}
        self.base_url = base_url
        http_options = types.HttpOptions(
            base_url=base_url or None,
            timeout=int(timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),  # TeacherClient retries, counting every attempt
        )
        if vertexai:
            self._secret = ""
            self.client = genai.Client(vertexai=True, project=project or None, location=location or None,
                                       http_options=http_options)
            self._where = f"Vertex AI project={project or '<default>'} location={location or '<default>'}"
        else:
            if api_key is None:
                api_key, source = find_api_key(api_key_env)
            else:
                source = "the api_key argument"
            self._secret = api_key
            self._key_source = source
            self.client = genai.Client(api_key=api_key, http_options=http_options)
            self._where = base_url or "the Gemini API"

    @property
    def backend_id(self) -> str:
        # The per-task limits change answers (a cut answer, less thinking), so they are part of every cache key.
        limits = json.dumps([self.max_output_tokens_by_task, self.thinking_budget_by_task], sort_keys=True)
        digest = hashlib.sha256(limits.encode()).hexdigest()[:12]
        return f"gemini:{self.model}:max_out={self.max_output_tokens}:limits={digest}"

    def generation_limits(self, task: str) -> dict[str, Any]:
        """GenerateContentConfig fields for `task`: its output cap and, when configured, its thinking budget."""
        limits: dict[str, Any] = {"max_output_tokens": self.max_output_tokens_by_task.get(task, self.max_output_tokens)
                                  or None}
        if task in self.thinking_budget_by_task:
            limits["thinking_config"] = types.ThinkingConfig(thinking_budget=self.thinking_budget_by_task[task])
        return limits

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "<redacted>") if self._secret else text

    def complete(self, request: TeacherRequest, *, reask_error: str | None = None) -> TeacherResponse:
        prompt = request.prompt
        if reask_error:
            prompt += (f"\n\nYour previous answer was rejected: {reask_error}\n"
                       "Answer again with JSON that fits the required schema exactly.")
        config = types.GenerateContentConfig(
            temperature=request.temperature,
            response_mime_type="application/json",
            response_json_schema=request.schema,
            **self.generation_limits(request.task),
            seed=request.sample_index,  # repeated samples of one prompt differ, each reproducibly (best effort)
        )
        try:
            response = self.client.models.generate_content(model=self.model, contents=prompt, config=config)
        except genai_errors.APIError as e:
            raise self._translate_api_error(e) from None  # `from None`: the chain holds request headers
        except _TIMEOUTS as e:
            raise RetryableTeacherError(f"Gemini request to {self._where} timed out ({type(e).__name__})") from None
        except _TRANSPORT as e:
            raise RetryableTeacherError(
                f"Gemini request to {self._where} failed: {type(e).__name__}: {self._redact(str(e))}") from None
        return TeacherResponse(text=response.text or "", model=getattr(response, "model_version", None) or self.model,
                               **_token_counts(response))

    def _translate_api_error(self, e: genai_errors.APIError) -> TeacherError:
        message = self._redact(f"{e.code} {e.status}: {e.message}")
        if e.code in RETRYABLE_STATUS:
            return RetryableTeacherError(f"Gemini at {self._where}: {message}")
        if e.code in AUTH_STATUS or "API_KEY" in str(e.details) or "API key" in str(e.message):
            source = getattr(self, "_key_source", "Vertex AI credentials")
            return TeacherAuthError(f"Gemini at {self._where} rejected the credentials from {source} ({message}); "
                                    "check the key or the Vertex AI settings")
        return TeacherError(f"Gemini at {self._where}: {message} (model {self.model!r})")


def _token_counts(response: Any) -> dict[str, int]:
    usage = getattr(response, "usage_metadata", None)
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    # Thinking tokens are billed as output.
    output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
    return {"input_tokens": usage.prompt_token_count or 0, "output_tokens": output}
