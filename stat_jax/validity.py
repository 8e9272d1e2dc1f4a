"""Whether a stored result is still valid: decided in one place, from what its producer read.

A result (a pipeline stage's files, a demo step's, a trainer's checkpoints and export) is a function of its input
files and of the config fields the code that made it read. So nobody lists those fields: the config a producer is
handed is a *recording view* (`watch`), every field it reads while a `Reads` log is open is noted with its value,
and the log is stored with the result. The result is reused only while `changed(log, config)` is empty and its
inputs hash the same. A field the producer never read cannot change its result; a field it read and that changed
re-runs it. The one hand-kept list is `NOT_RESULT_FIELDS`: fields that change how a result is computed (memory,
logging, parallelism), never what it is.

Rules of the recording view (a `ConfigDict`, so every consumer takes it):
- reading a leaf notes `section.field -> value` in every open log; `.get(k, default)` on an absent field notes it
  as absent;
- `copy_and_resolve_references()` (hence `config.sub_config`) returns a view too, so what a copy's reader reads
  is noted;
- a field written in a view is not a dependency of the logs open at that time (the writer decided its value);
  logs opened later (a trainer called with the copy) note it like any other;
- `replay(reads)` notes reads made earlier (a shared object built once: the teacher client, the student's
  backend), and values that are not config fields are named "@name" and compared against `context`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference

ABSENT = "<absent>"  # the recorded value of a field that did not exist when it was read

# Fields that change how a result is computed, not what it is: never a reason to redo work. A dotted key covers
# its whole section ("mesh" = every mesh field).
NOT_RESULT_FIELDS: tuple[str, ...] = (
    "workdir", "mesh", "stat.run_dir", "stat.stage_cache", "stat.wait_timeout_s", "stat.grade_workers",
    "stat.rollout_chunk_size",
    # memory and speed of a training step
    "model.remat", "model.attention_block", "train.grad_accum_steps", "train.memory_budget_gb",
    "train.memory_fraction", "train.loss_chunk_tokens", "grpo.micro_batches", "grpo.memory_budget_gb",
    "grpo.memory_fraction", "grpo.loss_chunk_tokens",
    # checkpointing and logging
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpointing", "train.log_every",
    "train.tensorboard", "train.export_dir", "grpo.checkpoint_every", "grpo.keep_checkpoints", "grpo.log_every",
    "grpo.tensorboard",
    # evaluation and rollout throughput, where results go
    "grpo.async_checkpointing", "eval.grade_workers", "eval.chunk_size", "eval.out_dir", "eval.progress",
    "rollout.max_concurrent_decodes", "rollout.prefill_batch_tokens", "rollout.cache_memory_fraction",
    # the teacher client's plumbing: answers come from its cache whatever these are
    "teacher.cache_dir", "teacher.max_workers", "teacher.max_retries", "teacher.backoff_initial_s",
    "teacher.backoff_max_s", "teacher.max_calls", "teacher.max_tokens", "teacher.price_input_per_mtok",
    "teacher.price_output_per_mtok", "teacher.timeout_s", "teacher.api_key_env", "teacher.project",
    "teacher.location",
)

_open_logs: list[Reads] = []  # innermost last; module-wide (teacher threads read the config too)
_view_ids = itertools.count()


def is_how(key: str) -> bool:
    """Whether `key` is in NOT_RESULT_FIELDS (changes how a result is computed, not what)."""
    return any(key == f or key.startswith(f + ".") for f in NOT_RESULT_FIELDS)


def normal(value: Any) -> Any:
    """A value as it is stored in a JSON manifest (tuples are lists; what JSON cannot hold is its str)."""
    return json.loads(json.dumps(value, default=str))


class Reads:
    """A log of the fields read while it is open: {dotted key or "@name": value as JSON}."""

    def __init__(self, on_new: Callable[[dict[str, Any]], None] | None = None):
        self.values: dict[str, Any] = {}
        self._shadow: set[tuple[int, str]] = set()  # (view id, key) written while this log was open
        self._on_new = on_new

    def note(self, key: str, value: Any, view: int | None = None) -> None:
        if key in self.values or is_how(key):
            return
        if view is not None and any((view, k) in self._shadow for k in _prefixes(key)):
            return
        self.values[key] = normal(value)
        if self._on_new is not None:
            self._on_new(dict(self.values))


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@contextlib.contextmanager
def reads(on_new: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Reads]:
    """Opens a log: every field a recording view gives out until it closes is noted in it (and in the logs open
    around it). `on_new(values)` is called when a new field is noted (to keep an attempt's record current)."""
    log = Reads(on_new)
    _open_logs.append(log)
    try:
        yield log
    finally:
        _open_logs.remove(log)


def replay(values: Mapping[str, Any]) -> None:
    """Notes `values` (reads made earlier, or "@name" values that are not config fields) in the open logs."""
    for log in _open_logs:
        for key, value in values.items():
            log.note(key, value)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Reads in this block are not dependencies (dumping the whole config to a file, printing it)."""
    saved = list(_open_logs)
    _open_logs.clear()
    try:
        yield
    finally:
        _open_logs.extend(saved)


class _View(ConfigDict):
    """A ConfigDict whose leaf reads are noted in the open `Reads` logs (see the module docstring)."""

    _prefix = ""
    _view = -1

    def _set_meta(self, prefix: str, view: int) -> None:
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_view", view)

    def __getitem__(self, key):
        if isinstance(key, str) and "." in key and not self.allow_dotted_keys:
            head, rest = key.split(".", 1)
            return self[head][rest]
        try:
            value = super().__getitem__(key)
        except KeyError:
            self._note(key, ABSENT)
            raise
        if not isinstance(value, ConfigDict):
            self._note(key, value)
        return value

    def _note(self, key: Any, value: Any) -> None:
        for log in _open_logs:
            log.note(f"{self._prefix}{key}", value, self._view)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        full = f"{self._prefix}{key}"
        for log in _open_logs:
            log._shadow.add((self._view, full))
        field = self._fields.get(key)
        if isinstance(field, ConfigDict):  # a section set whole: its fields are read through this view too
            self._fields[key] = _build(_plain(field), f"{full}.", self._view)

    def copy_and_resolve_references(self, visit_map=None):
        copy = _build(_plain(self), self._prefix, next(_view_ids))
        for log in _open_logs:  # what was written in this view stays written in its copy
            log._shadow |= {(copy._view, k) for v, k in log._shadow if v == self._view}
        return copy

    def to_dict(self, visit_map=None, preserve_field_references=False):
        """The section as a dict: every field in it is noted (a reader of the whole section depends on all)."""
        out = _plain(self).to_dict()
        for key, value in _leaves(out, self._prefix):
            for log in _open_logs:
                log.note(key, value, self._view)
        return out


def _leaves(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def leaves(config: ConfigDict) -> list[tuple[str, Any]]:
    """(dotted key, value) of every field of `config`, read without noting them."""
    return list(_leaves(_plain(config).to_dict()))


def _plain(config: ConfigDict) -> ConfigDict:
    """A plain ConfigDict copy (references resolved) made without noting any read."""
    out = ConfigDict()
    for key, value in config._fields.items():
        value = value.get() if isinstance(value, FieldReference) else value
        out[key] = _plain(value) if isinstance(value, ConfigDict) else value
    object.__setattr__(out, "_locked", config.is_locked)
    return out


def _build(config: ConfigDict, prefix: str, view: int) -> _View:
    out = _View(type_safe=config.is_type_safe)
    out._set_meta(prefix, view)
    for key, value in config._fields.items():
        value = value.get() if isinstance(value, FieldReference) else value
        out._fields[key] = _build(value, f"{prefix}{key}.", view) if isinstance(value, ConfigDict) else value
    object.__setattr__(out, "_locked", config.is_locked)
    return out


def watch(config: ConfigDict) -> ConfigDict:
    """A recording view of `config` (itself when it is one already; anything but a ConfigDict as it is)."""
    if isinstance(config, _View) or not isinstance(config, ConfigDict):
        return config
    return _build(_plain(config), "", next(_view_ids))


def current(config: ConfigDict, key: str) -> Any:
    """The value of dotted `key` in `config` (ABSENT when it is not a field), read without noting it."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node._fields:
            return ABSENT
        node = node._fields[part]
        if isinstance(node, FieldReference):
            node = node.get()
    return _plain(node).to_dict() if isinstance(node, ConfigDict) else node


def changed(recorded: Mapping[str, Any], config: ConfigDict,
            context: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded value, value now)} for every recorded read whose value differs now; "@name" entries are
    looked up in `context`. Empty: the result made with `recorded` is still valid for `config`."""
    context = context or {}
    out = {}
    for key, was in recorded.items():
        now = normal(context.get(key, ABSENT) if key.startswith("@") else current(config, key))
        if now != was:
            out[key] = (was, now)
    return out


def describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 3) -> str:
    """'train.learning_rate 0.0003 -> 0.0001, seed 0 -> 1' (the first `limit` changes)."""
    items = [f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in list(diff.items())[:limit]]
    more = len(diff) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")
