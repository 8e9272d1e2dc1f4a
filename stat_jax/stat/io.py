"""Run-directory files for the STAT stages: atomic JSON/JSONL writes, hashes, and per-stage manifests.

A stage is finished when `<stage>/manifest.json` exists, none of the config fields it read has changed
since (stat_jax/validity.py), its inputs hash the same, and every output it lists still has the recorded
hash. Anything else re-runs the stage (teacher answers come back from the cache, so a re-run costs nothing).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stat_jax import validity
from stat_jax.data.records import MathProblem
from stat_jax.errors import RunStateMissingError
from stat_jax.teacher.cache import atomic_write_text

MANIFEST = "manifest.json"


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStateMissingError(f"{path} is missing: run the stage that writes it first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); delete it and re-run its stage") from None


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    lines = [json.dumps(dict(r), sort_keys=True, default=str) for r in rows]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise RunStateMissingError(f"{path} is missing: run the stage that writes it first")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); delete the file and re-run "
                                     "its stage") from None
    return rows


def read_problems(path: Path) -> list[MathProblem]:
    """A JSONL file of MathProblem rows (a stage's data/train.jsonl, hard/hard.jsonl, a demo split)."""
    return [MathProblem.from_dict(r) for r in read_jsonl(path)]


def file_hash(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def input_hashes(run_dir: Path, names: Sequence[str]) -> dict[str, str]:
    return {name: file_hash(run_dir / name) for name in names}


def stage_is_done(run_dir: Path, stage: str, config: Any, inputs: Sequence[str],
                  context: Mapping[str, Any] | None = None, outputs: Sequence[str] = ()) -> bool:
    """True when the stage's manifest says it is still valid: none of the config fields it read has changed
    (`validity.changed`; "@name" values against `context`), its inputs hash the same, and its outputs (every one
    in `outputs`, what the stage writes now, among them) are intact."""
    manifest_path = run_dir / stage / MANIFEST
    if not manifest_path.exists():
        return False
    try:
        manifest = read_json(manifest_path)
        if "reads" not in manifest or validity.changed(manifest["reads"], config, context):
            return False
        if manifest.get("inputs") != input_hashes(run_dir, inputs) or not set(outputs) <= set(manifest["outputs"]):
            return False
        return all((run_dir / n).exists() and file_hash(run_dir / n) == h for n, h in manifest["outputs"].items())
    except (ValueError, FileNotFoundError, KeyError):
        return False


def write_manifest(run_dir: Path, stage: str, reads: Mapping[str, Any], inputs: Sequence[str],
                   outputs: Sequence[str], extra: Mapping[str, Any] | None = None) -> None:
    missing = [n for n in outputs if not (run_dir / n).exists()]
    if missing:
        raise RuntimeError(f"stage {stage!r} finished without writing {missing} under {run_dir}")
    write_json(run_dir / stage / MANIFEST, {
        "stage": stage, "reads": dict(reads), "inputs": input_hashes(run_dir, inputs),
        "outputs": input_hashes(run_dir, outputs),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(dict(extra) if extra else {}),
    })


def run_recorded(run_dir: Path, stage: str, inputs: Sequence[str], outputs: Sequence[str],
                 run: Callable[[], Mapping[str, Any] | None], *, write: bool = True,
                 on_read: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs one stage with a `validity.reads` log open and records its manifest: the config fields it read (and
    the "@name" values it replayed), input and output hashes, stats, seconds.

    The one way a stage of `stat-jax run` and a step of `stat-jax demo` is run: the callers decide, with
    `stage_is_done`, whether it needs to run; `write=False` is a process of a multi-host job other than
    process 0, which runs its share but leaves the manifest to process 0. `on_read(reads)` sees each new read
    (the caller keeps an attempt record with it, so a killed stage's partial work is judged by the same rule).
    """
    start = time.monotonic()
    with validity.reads(on_new=on_read) as log:
        stats = dict(run() or {})
    if write:
        write_manifest(run_dir, stage, log.values, inputs, outputs,
                       extra={"stats": stats, "seconds": round(time.monotonic() - start, 3)})
    return stats
