"""The teacher interface: one structured request in, one JSON answer out.

Backends (Gemini through google-genai; the offline rule-based teacher of the demo) implement
`TeacherBackend.complete`. Everything around a backend -- cache, retries, schema validation and re-asks,
ledger, budget -- is shared code in this package and wraps any backend the same way.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from typing import Any

from stat_jax.errors import BudgetFailure, TeacherFailure


@dataclasses.dataclass(frozen=True)
class TeacherRequest:
    """What the teacher is asked.

    task: the job, e.g. "propose_skills", "label_skills", "diagnose", "synthesize", "solve".
    prompt: the full text sent to an LLM teacher (rendered by `teacher.prompts`).
    schema: JSON schema the answer must satisfy.
    payload: the structured inputs the prompt was rendered from (an offline teacher reads these instead
      of parsing prompt text); part of the cache key.
    sample_index: distinguishes repeated samples of the same request (e.g. 3 solutions).
    """

    task: str
    prompt: str
    schema: dict[str, Any]
    payload: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 0.0
    sample_index: int = 0

    def cache_key(self, backend_id: str) -> str:
        blob = json.dumps(
            {"backend": backend_id, "task": self.task, "prompt": self.prompt, "schema": self.schema,
             "payload": self.payload, "temperature": self.temperature, "sample": self.sample_index},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass
class TeacherResponse:
    text: str  # the raw answer; must parse as JSON fitting the request schema
    input_tokens: int = 0
    output_tokens: int = 0
    model: str = ""


class TeacherBackend(abc.ABC):
    """A source of teacher answers."""

    # Whether the answer cache fsyncs each answer before it counts as stored. True for anything that is paid for
    # or slow to ask again; a backend whose answers are free and deterministic may set False (a lost file is a
    # cache miss, answered again in microseconds).
    durable_answers: bool = True

    @property
    @abc.abstractmethod
    def backend_id(self) -> str:
        """Identifies everything about the backend that changes answers (e.g. 'gemini:gemini-2.5-pro')."""

    @abc.abstractmethod
    def complete(self, request: TeacherRequest, *, reask_error: str | None = None) -> TeacherResponse:
        """Answers one request. `reask_error` carries the validation error of a previous bad answer."""


class TeacherError(TeacherFailure, RuntimeError):
    """A teacher call failed for good (after retries); the message never contains credentials."""


class RetryableTeacherError(TeacherError):
    """A transient failure (429, 5xx, timeout) that the retry loop may try again."""


class BudgetExceeded(BudgetFailure, TeacherError):  # BudgetFailure first: its exit status and hint
    """The configured call/token budget is spent; the stage stops cleanly and can be resumed."""
