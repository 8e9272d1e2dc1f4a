"""Loaders for the math benchmarks, all returning `MathProblem` lists.

Each loader takes `source`: a Hugging Face hub dataset name (default: the usual public copy, named in the
loader's docstring), or a local file/directory (JSON list, JSONL, parquet, or a tree of one-problem JSON
files as in the original MATH release). Reference answers come from the last `\\boxed{}` of a MATH solution,
from `#### n` in GSM8K, and from the `answer` field elsewhere. A malformed row raises `DatasetError` naming
the file and line (or row), or is skipped and counted with `on_bad_row="skip"` (`read_benchmark` returns the
count and where each bad row is).

A benchmark of the user's own (any name that is not in BENCHMARKS) is a local file whose rows hold a question
and an answer (or a solution with a `\\boxed{}` answer); `fields` maps those roles to the file's keys
(`parse_fields("problem:q,answer:a")`), so no code is needed for a new benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from stat_jax.data.grader import gsm8k_answer, last_boxed
from stat_jax.data.records import MathProblem
from stat_jax.errors import DataError

logger = logging.getLogger(__name__)

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
OnBadRow = Literal["error", "skip"]
# Roles a row's fields can play (`fields` / --config.eval.fields.<name>); "question" is another name for "problem".
FIELD_ROLES = ("problem", "answer", "solution", "id", "subject", "level")
CUSTOM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DatasetError(DataError, ValueError):
    """A dataset could not be loaded, or one of its rows is malformed; the message says where and what to do."""


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the hub and how one of its rows becomes a MathProblem."""

    name: str
    hub_name: str
    split: str
    hub_configs: tuple[str | None, ...]  # configs of the default hub copy to concatenate
    row_to_problem: Callable[[Mapping[str, Any], str, str], MathProblem]  # (row, row id, location)
    fields: str  # the row schema, for error messages
    flexible_rule: str = "math"  # how pass@1_flexible reads an answer (stat_jax.data.grader.FLEXIBLE_RULES)


def _field(row: Mapping[str, Any], names: Sequence[str], where: str) -> Any:
    for name in names:
        if name in row and row[name] is not None and str(row[name]).strip() != "":
            return row[name]
    tried = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
    raise DatasetError(f"{where}: missing or empty field {names[0]!r}{tried}; the row has keys {sorted(row)}")


def _optional(row: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    return None


def _answer_str(value: Any) -> str:
    """Answers stored as numbers (AIME/AMC copies) become '27', not '27.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _level_str(value: Any) -> str | None:
    """MATH writes 'Level 5', MATH-500 writes 5: both become 'Level 5'."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text if text.lower().startswith("level") else f"Level {text}"


def _row_id(row: Mapping[str, Any], fallback: str) -> str:
    value = _optional(row, ("unique_id", "id", "idx"))
    if value is None:
        return fallback
    # AIME 2025 numbers problems 1..15 in each of its two papers: the paper ('aime_2025_I') makes them unique.
    competition = _optional(row, ("competition",))
    return f"{competition}/{value}" if competition is not None else str(value)


def _math_row(row: Mapping[str, Any], row_id: str, where: str) -> MathProblem:
    """Hendrycks MATH: problem, solution (answer = its last \\boxed{}), level, type."""
    problem = _field(row, ("problem", "question"), where)
    solution = _field(row, ("solution",), where)
    answer = _optional(row, ("answer",))
    if answer is None:
        answer = last_boxed(solution)
        if answer is None:
            raise DatasetError(f"{where}: no complete \\boxed{{...}} answer in field 'solution': {solution[-120:]!r}")
    subject = _optional(row, ("type", "subject"))
    return MathProblem(id=row_id, problem=problem, answer=_answer_str(answer), solution=solution,
                       subject=subject, level=_level_str(_optional(row, ("level",))))


def _gsm8k_row(row: Mapping[str, Any], row_id: str, where: str) -> MathProblem:
    """GSM8K: question, answer (a worked solution ending in '#### <number>')."""
    problem = _field(row, ("question", "problem"), where)
    solution = str(_field(row, ("answer",), where))
    answer = gsm8k_answer(solution)
    if answer is None:
        raise DatasetError(f"{where}: field 'answer' has no '#### <number>' final answer: {solution[-120:]!r}")
    return MathProblem(id=row_id, problem=problem, answer=answer, solution=solution)


def _reference_answer(answer: Any, solution: str | None, answer_key: str, solution_key: str, where: str) -> str:
    """An explicit answer ('#### n' GSM8K-style answers give n), else the last \\boxed{} of the solution."""
    if answer is not None:
        text = _answer_str(answer)
        return (gsm8k_answer(text) or text) if "####" in text else text
    boxed = last_boxed(solution) if solution else None
    if boxed is None:
        raise DatasetError(f"{where}: no answer: field {answer_key!r} is missing or empty and field {solution_key!r} "
                           f"has no complete \\boxed{{...}} answer" + (f": {solution[-120:]!r}" if solution else ""))
    return boxed


def _answer_row(row: Mapping[str, Any], row_id: str, where: str) -> MathProblem:
    """MATH-500 / AIME / AMC: problem (or question) and an explicit answer; solution/subject/level if present."""
    problem = _field(row, ("problem", "question", "Problem", "Question"), where)
    answer = _field(row, ("answer", "Answer"), where)
    return MathProblem(
        id=row_id, problem=problem, answer=_answer_str(answer), solution=_optional(row, ("solution", "Solution")),
        subject=_optional(row, ("subject", "type")), level=_level_str(_optional(row, ("level",))),
    )


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("math", "EleutherAI/hendrycks_math", "test", MATH_SUBJECTS, _math_row,
                      "problem, solution (with \\boxed{answer}), level, type"),
        BenchmarkSpec("math_train", "EleutherAI/hendrycks_math", "train", MATH_SUBJECTS, _math_row,
                      "problem, solution (with \\boxed{answer}), level, type"),
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", (None,), _answer_row,
                      "problem, answer, solution, subject, level, unique_id"),
        BenchmarkSpec("gsm8k", "openai/gsm8k", "test", ("main",), _gsm8k_row,
                      "question, answer (solution ending in '#### <number>')", flexible_rule="gsm8k"),
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", "train", (None,), _answer_row, "problem, answer, id"),
        BenchmarkSpec("aime25", "yentinglin/aime_2025", "train", (None,), _answer_row, "problem, answer, id"),
        BenchmarkSpec("amc23", "math-ai/amc23", "test", (None,), _answer_row, "question, answer, id"),
    )
}


def is_local(source: str) -> bool:
    """A path on this machine (it exists, or reads like a path or data file), not a hub dataset name."""
    return os.path.exists(source) or source.endswith(LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def _iter_local_file(path: Path) -> Iterator[tuple[str, Mapping[str, Any] | DatasetError]]:
    """Yields (location, row or the error that makes it malformed) for one file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, DatasetError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                yield where, row if isinstance(row, dict) else DatasetError(
                    f"{where}: expected a JSON object per line, got {type(row).__name__}")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, dict):  # one problem per file (the original MATH release)
            yield str(path), data
            return
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of rows or one row object, got {type(data).__name__}")
        for i, row in enumerate(data):
            where = f"{path}: item {i}"
            yield where, row if isinstance(row, dict) else DatasetError(
                f"{where}: expected a JSON object, got {type(row).__name__}")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", row
    else:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _iter_local(source: str) -> Iterator[tuple[str, str, Mapping[str, Any] | DatasetError]]:
    """Yields (default row id, location, row or error) for a file or a directory tree of files."""
    root = Path(source).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or directory")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DatasetError(f"{root}: directory holds no {', '.join(LOCAL_SUFFIXES)} files")
    else:
        files = [root]
    for path in files:
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        for i, (where, row) in enumerate(_iter_local_file(path)):
            # One-problem files (MATH release) are named by their path, like MATH-500's 'test/algebra/1.json'.
            default_id = rel if where == str(path) else f"{rel}:{i}"
            yield default_id, where, row


def _iter_hub(spec: BenchmarkSpec, hub_name: str, split: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    import datasets

    configs = spec.hub_configs if hub_name == spec.hub_name else (None,)
    for config in configs:
        try:
            ds = datasets.load_dataset(hub_name, config, split=split)
        except Exception as e:
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            raise DatasetError(
                f"could not load benchmark {spec.name!r} from the Hugging Face hub dataset {hub_name!r} "
                f"(config {config!r}, split {split!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                f"{' [offline mode: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1]' if offline else ''}. "
                f"Pass a local copy instead: source='/path/to/{spec.name}.jsonl' (JSON, JSONL or parquet rows with "
                f"fields {spec.fields}); from the CLI: --config.eval.paths.{spec.name}=/path/to/file. "
                f"To make one on a machine with network: `huggingface-cli download --repo-type dataset {hub_name}`."
            ) from e
        for i, row in enumerate(ds):
            yield f"{config + '/' if config else ''}{split}/{i}", f"{hub_name}[{config or 'default'}/{split}] row {i}", row


def parse_fields(spec: str | Mapping[str, str], *, key: str = "fields") -> dict[str, str]:
    """'problem:q,answer:a' (or a {role: field} mapping) -> {role: field name}; roles are FIELD_ROLES.

    A file needs a problem and an answer or a solution (whose last \\boxed{} is the answer); roles left out
    take the usual names (problem/question, answer, solution, unique_id/id, subject/type, level).
    """
    pairs = spec.items() if isinstance(spec, Mapping) else (
        part.split(":", 1) if ":" in part else (part, "") for part in spec.split(",") if part.strip())
    fields: dict[str, str] = {}
    for role, field in pairs:
        role, field = role.strip(), field.strip()
        role = "problem" if role == "question" else role
        if role not in FIELD_ROLES or not field:
            raise DatasetError(f"{key}={spec!r}: {role!r}:{field!r} is not ROLE:FIELD with ROLE one of "
                               f"{', '.join(FIELD_ROLES)}; e.g. problem:question,answer:final_answer")
        fields[role] = field
    return fields


def _mapped_row(fields: Mapping[str, str]) -> Callable[[Mapping[str, Any], str, str], MathProblem]:
    """A row reader for a user's file: named fields first, then the usual names for roles not mapped."""

    def names(role: str, usual: tuple[str, ...]) -> tuple[str, ...]:
        return (fields[role],) if role in fields else usual

    def row_to_problem(row: Mapping[str, Any], row_id: str, where: str) -> MathProblem:
        problem_keys = names("problem", ("problem", "question", "Problem", "Question"))
        answer_keys = names("answer", ("answer", "Answer"))
        solution_keys = names("solution", ("solution", "Solution"))
        solution = _optional(row, solution_keys)
        answer = _reference_answer(_optional(row, answer_keys), None if solution is None else str(solution),
                                   answer_keys[0], solution_keys[0], where)
        problem_id = _optional(row, (fields["id"],)) if "id" in fields else None
        return MathProblem(
            id=f"{row_id.split('/', 1)[0]}/{problem_id}" if problem_id is not None else row_id,
            problem=str(_field(row, problem_keys, where)), answer=answer,
            solution=None if solution is None else str(solution),
            subject=_optional(row, names("subject", ("subject", "type"))),
            level=_level_str(_optional(row, names("level", ("level",)))))

    return row_to_problem


def benchmark_spec(name: str, fields: Mapping[str, str] | None = None) -> BenchmarkSpec:
    """The spec of a known benchmark (its row reader replaced when `fields` is given) or of a user's own file."""
    if name in BENCHMARKS:
        spec = BENCHMARKS[name]
        return dataclasses.replace(spec, row_to_problem=_mapped_row(fields)) if fields else spec
    if not CUSTOM_NAME.match(name):
        raise DatasetError(f"benchmark name {name!r}: use lower-case letters, digits and '_' (a config key)")
    return BenchmarkSpec(name, "", "", (None,), _mapped_row(fields or {}),
                         "a question (problem), and an answer or a solution with \\boxed{answer}")


@dataclasses.dataclass
class LoadedBenchmark:
    """The problems of one benchmark, and the rows that could not be read (with on_bad_row='skip')."""

    name: str
    source: str
    problems: list[MathProblem]
    bad_rows: list[str]  # one message per skipped row: file:line and what is wrong

    def report(self, examples: int = 5) -> dict[str, Any]:
        """For manifests and summaries: how many rows were used, how many skipped, and the first few reasons."""
        return {"source": self.source, "problems": len(self.problems), "bad_rows": len(self.bad_rows),
                "bad_row_examples": self.bad_rows[:examples]}


def read_benchmark(
    name: str,
    source: str | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    on_bad_row: OnBadRow = "error",
    fields: Mapping[str, str] | str | None = None,
) -> LoadedBenchmark:
    """Loads benchmark `name` from `source` (hub name or local path; default hub copy), counting bad rows.

    `name` is a key of BENCHMARKS, or any other name for a local file of the user's (then `source` is needed);
    `fields` maps roles to the file's field names (see `parse_fields`).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fields = parse_fields(fields) if isinstance(fields, str) else fields
    spec = benchmark_spec(name, fields)
    if name not in BENCHMARKS and not source:
        raise DatasetError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}. For a file of your own: "
                           f"--config.eval.paths.{name}=FILE.jsonl [--config.eval.fields.{name}=problem:q,answer:a]")
    source = source or spec.hub_name
    split = split or spec.split
    local = is_local(source)
    if not local and name not in BENCHMARKS:
        raise DatasetError(f"benchmark {name!r}: {source!r} is no local file or directory; the hub is only used "
                           f"for the known benchmarks ({', '.join(BENCHMARKS)})")
    rows = _iter_local(source) if local else _iter_hub(spec, source, split)
    problems: list[MathProblem] = []
    skipped: list[str] = []
    for default_id, where, row in rows:
        try:
            if isinstance(row, DatasetError):
                raise row
            problem = spec.row_to_problem(row, f"{name}/{_row_id(row, default_id)}", where)
        except DatasetError as e:
            if on_bad_row == "error":
                raise
            skipped.append(str(e))
            continue
        problem.source = source if local else f"{source}:{split}"
        problems.append(problem)
        if limit and len(problems) >= limit:
            break
    if skipped:
        logger.warning("%s: skipped %d malformed rows of %s (first: %s)", name, len(skipped), source, skipped[0])
    if not problems:
        raise DatasetError(f"{source}: no usable {name} rows" + (f" ({len(skipped)} malformed)" if skipped else ""))
    _check_unique_ids(problems, source)
    return LoadedBenchmark(name, source, problems, skipped)


def load_benchmark(
    name: str,
    source: str | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    on_bad_row: OnBadRow = "error",
    fields: Mapping[str, str] | str | None = None,
) -> list[MathProblem]:
    """The problems of `read_benchmark(...)` (bad rows raise, or are skipped and logged)."""
    return read_benchmark(name, source, split=split, limit=limit, on_bad_row=on_bad_row, fields=fields).problems


def load_answer_file(path: str | Path) -> list[MathProblem]:
    """Problems with an explicit answer ({problem | question, answer, ...}) from a local file or folder.

    For prompt lists that are no named benchmark (GRPO prompts, STAT question lists); JSON, JSONL or parquet.
    A malformed row raises DatasetError naming the file and line.
    """
    problems = []
    for default_id, where, row in _iter_local(str(path)):
        if isinstance(row, DatasetError):
            raise row
        problem = _answer_row(row, _row_id(row, default_id), where)
        problem.source = str(path)
        problems.append(problem)
    if not problems:
        raise DatasetError(f"{path}: no problems")
    return problems


def _check_unique_ids(problems: Sequence[MathProblem], source: str) -> None:
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise DatasetError(f"{source}: duplicate problem id {p.id!r}; ids must be unique (field 'unique_id'/'id')")
        seen.add(p.id)
