"""Builds the teacher backend and its `TeacherClient` from `config.teacher`.

`teacher.backend` names a factory in `BACKENDS` (a new API is one `TeacherBackend` subclass and one
`register_backend` line), or "package.module:ClassName" for a class built without arguments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stat_jax.teacher.base import TeacherBackend, TeacherError
from stat_jax.teacher.client import Budget, Pricing, RetryPolicy, TeacherClient


def _gemini(tc: Any) -> TeacherBackend:
    from stat_jax.teacher.gemini import GeminiTeacher

    return GeminiTeacher(tc.model, api_key_env=tc.api_key_env, base_url=tc.base_url, vertexai=tc.vertexai,
                         project=tc.project, location=tc.location, timeout_s=tc.timeout_s,
                         max_output_tokens=tc.max_output_tokens,
                         max_output_tokens_by_task=dict(tc.get("max_output_tokens_by_task", {}) or {}),
                         thinking_budget_by_task=dict(tc.get("thinking_budget_by_task", {}) or {}))


def _offline(tc: Any) -> TeacherBackend:
    from stat_jax.teacher.offline import OfflineTeacher  # the demo's: rule-based, for the arithmetic task

    return OfflineTeacher(seed=int(tc.offline_seed), solution_slip_rate=float(tc.offline_slip_rate),
                          label_noise=float(tc.offline_label_noise), max_missing_skills=int(tc.offline_max_missing))


# teacher.backend name -> build(config.teacher) -> TeacherBackend
BACKENDS: dict[str, Callable[[Any], TeacherBackend]] = {"gemini": _gemini, "offline": _offline}


def register_backend(name: str, build: Callable[[Any], TeacherBackend]) -> None:
    """Makes `teacher.backend=name` build its backend with `build(config.teacher)`."""
    BACKENDS[name] = build


def build_backend(tc: Any) -> TeacherBackend:
    """The backend `teacher.backend` names: a key of BACKENDS, or "module.path:ClassName" (e.g. the demo's)."""
    if tc.backend in BACKENDS:
        return BACKENDS[tc.backend](tc)
    module_name, _, class_name = tc.backend.partition(":")
    if not class_name:
        raise TeacherError(f"teacher.backend={tc.backend!r}: use one of {sorted(BACKENDS)} or "
                           "'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise TeacherError(f"teacher.backend={tc.backend!r} cannot be imported: {e}") from e
    return cls()


def build_teacher_client(config: Any, run_dir: str | Path, backend: TeacherBackend | None = None,
                         seed: int | None = None) -> TeacherClient:
    """A `TeacherClient` whose cache and ledger live in `teacher.cache_dir` (default: `<run_dir>/teacher`);
    `seed` (default: config.seed) seeds its sampled requests."""
    tc = config.teacher
    root = Path(tc.cache_dir) if tc.cache_dir else Path(run_dir) / "teacher"
    return TeacherClient(
        backend if backend is not None else build_backend(tc),
        cache_dir=root / "cache",
        ledger_path=root / "ledger.jsonl",
        max_workers=tc.max_workers,
        retry=RetryPolicy(max_retries=tc.max_retries, initial_delay=tc.backoff_initial_s,
                          max_delay=tc.backoff_max_s, max_reasks=tc.max_reasks),
        budget=Budget(max_calls=tc.max_calls, max_tokens=tc.max_tokens),
        pricing=Pricing(input_per_mtok=tc.price_input_per_mtok, output_per_mtok=tc.price_output_per_mtok),
        seed=config.seed if seed is None else seed,
    )
