"""Checks of a command's inputs before any heavy work (devices, weights, downloads), every problem at once.

`check_inputs(command, config, args)` returns a list of `StatJaxError`s, cheapest checks first: config values,
the model directory (config.json, tokenizer, weights), local data files and their first row, lengths, the
teacher's credentials for the stages that call it, and the workdir's state. `stat-jax` (cli.py) raises them
as one error listing each problem on its own line. Checks read files only: no devices, weights or downloads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stat_jax.data.math_datasets import is_local
from stat_jax.errors import (
    CheckpointsExistError,
    ConfigError,
    DataError,
    ModelNotFoundError,
    StatJaxError,
    TeacherFailure,
)

log = logging.getLogger(__name__)

STUDENT_STAGES = ("rollout", "sft")  # stages that load config.model.path (eval/grpo load the sft export)


def check_inputs(command: str, config: Any, args: Any) -> list[StatJaxError]:
    """Every problem found with the inputs of `stat-jax <command>`, cheapest check first."""
    checks = CHECKS.get(command)
    return list(checks(config, args)) if checks else []


# ----- the model directory -----------------------------------------------------------------------------------
def _is_hub_name(ref: str) -> bool:
    """`org/name` that is not a local path: resolved by the hub at load time (models/hub.py)."""
    return not ref.startswith((".", "/", "~")) and ref.count("/") == 1 and not Path(ref).expanduser().exists()


def check_model_dir(model_cfg: Any, who: str, *, chat_template: bool = False) -> list[StatJaxError]:
    """config.json, weights and tokenizer of `model.path` (models/dir_check.py), every problem at once.

    `chat_template`: the command renders chat prompts, so the tokenizer must have a template.
    """
    from stat_jax.models.dir_check import model_dir_problems

    ref = model_cfg.path
    if not ref:
        return [ConfigError(f"{who} needs a student and model.path is empty",
                            hint="pass --config.model.path=DIR (a Hugging Face checkpoint directory, or "
                                 "`stat-jax import-gguf FILE DIR` first)")]
    if _is_hub_name(ref):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return [ModelNotFoundError(f"model.path={ref!r} is not a local directory and HF_HUB_OFFLINE=1",
                                       hint=f"download it first (`huggingface-cli download {ref} --local-dir DIR`) "
                                            "and pass --config.model.path=DIR")]
        return []  # downloaded when the command loads it
    path = Path(ref).expanduser()
    if not path.exists():
        return [ModelNotFoundError(f"model directory {path} does not exist (model.path)")]
    if not path.is_dir():
        return [ModelNotFoundError(f"model.path={path} is a file, not a checkpoint directory")]
    tok_key = "model.tokenizer_path" if model_cfg.tokenizer_path else "model.path"
    tok_dir = Path(model_cfg.tokenizer_path).expanduser() if model_cfg.tokenizer_path else path
    return model_dir_problems(path, tokenizer_dir=tok_dir, tokenizer_key=tok_key, chat_template=chat_template)


# ----- data files ----------------------------------------------------------------------------------------

def check_benchmark_file(name: str, source: str, key: str, **load_kw) -> list[StatJaxError]:
    """A local benchmark file exists and its first row reads as a question with an answer."""
    from stat_jax.data.math_datasets import load_benchmark

    if not Path(source).expanduser().exists():
        return [DataError(f"{key}={source}: no such file or directory")]
    try:
        load_benchmark(name, source, limit=1, **load_kw)
    except StatJaxError as e:
        return [_with_key(e, key)]
    return []


def check_sft_files(files: Iterable[str], key: str) -> list[StatJaxError]:
    """Each SFT file exists and its first record is a {prompt | messages, response} example."""
    from stat_jax.data.sft_data import SFTDataError, parse_record

    problems: list[StatJaxError] = []
    for f in files:
        path = Path(f).expanduser()
        if not path.exists():
            problems.append(DataError(f"{key}: {path}: no such file or directory"))
        elif path.is_file() and path.suffix == ".jsonl":
            first = _first_jsonl_row(path)
            if isinstance(first, StatJaxError):
                problems.append(first)
            elif first is not None:
                try:
                    parse_record(first[1], first[0])
                except SFTDataError as e:
                    problems.append(e)
    return problems


def _first_jsonl_row(path: Path) -> tuple[str, Any] | StatJaxError | None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    return f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    return DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
    return DataError(f"{path}: empty file")


def _with_key(error: StatJaxError, key: str) -> StatJaxError:
    if key not in str(error):
        error.args = (f"{key}: {error}",) + error.args[1:]
    return error


def _benchmark_load_kw(ev: Any, name: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"on_bad_row": ev.get("on_bad_row", "error")}
    fields = ev.get("fields")
    if fields is not None and name in fields and fields[name]:  # user-named fields (when the config has them)
        kw["fields"] = fields[name]
    return kw


# ----- lengths, teacher, workdir ------------------------------------------------------------------------
def check_lengths(config: Any, command: str) -> list[StatJaxError]:
    """The config's token-length limits fit together (stat_jax.lengths), one problem per relation."""
    from stat_jax.lengths import config_length_problems

    return [ConfigError(p, hint="set the lengths so they fit (configs/base.py `rollout` says how they relate)")
            for p in config_length_problems(config, command)]


def check_rollout_settings(r: Any) -> list[StatJaxError]:
    """rollout.backend names a backend, and the client backend has a server address."""
    backends = ("jetstream", "client")  # stat_jax.rollout.factory.BACKENDS, without importing the engine
    if r.backend not in backends:
        return [ConfigError(f"rollout.backend={r.backend!r} is not one of {backends}")]
    if r.backend == "client" and not r.address:
        return [ConfigError("rollout.backend=client needs rollout.address",
                            hint="pass --config.rollout.address=HOST:PORT of a running `stat-jax serve`")]
    return []


def check_teacher_credentials(tc: Any) -> list[StatJaxError]:
    """The Gemini backend finds an API key (or is told to use Vertex AI); other backends bring their own."""
    if tc.backend != "gemini" or tc.vertexai:
        return []
    names = (tc.api_key_env,) if tc.api_key_env else ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    if any(os.environ.get(n, "").strip() for n in names):
        return []
    return [TeacherFailure(f"the teacher (teacher.backend=gemini) has no API key: {' and '.join(names)} "
                           "are not set",
                           hint=f"export {names[0]}=... (or --config.teacher.vertexai=true with "
                                "--config.teacher.project/location, or another teacher.backend)")]


def check_checkpoints(workdir: Path, resume: bool) -> list[StatJaxError]:
    """A trainer's workdir with checkpoints needs --resume (or another workdir)."""
    ckpt = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()) if ckpt.is_dir() else []
    if steps and not resume:
        return [CheckpointsExistError(f"{ckpt} already holds checkpoints (latest step {steps[-1]}) and --resume "
                                      "was not given")]
    if steps:  # --resume: the checkpoint it will read is complete (its array data is checked when read)
        from stat_jax.train.checkpointing import damaged_error, step_dir_problems

        problems = step_dir_problems(ckpt / str(steps[-1]))
        return [damaged_error(ckpt / str(steps[-1]), "; ".join(problems), steps)] if problems else []
    return []


# ----- per command ----------------------------------------------------------------------------------------
def _check_eval(config: Any, args: Any) -> list[StatJaxError]:
    from stat_jax.data.math_datasets import BENCHMARKS
    from stat_jax.eval.evaluate import benchmark_names

    ev = config.eval
    problems = check_rollout_settings(config.rollout) + check_model_dir(
        config.model, "stat-jax eval", chat_template=bool(ev.use_chat_template))
    try:
        names = benchmark_names(ev.benchmarks)
    except ValueError as e:
        return problems + [ConfigError(str(e))]
    for name in names:
        source = ev.paths.get(name) if name in ev.paths else None
        if source and is_local(source):
            problems += check_benchmark_file(name, source, f"eval.paths.{name}", **_benchmark_load_kw(ev, name))
        elif not source and name not in BENCHMARKS:
            problems.append(ConfigError(f"eval.benchmarks: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}",
                                        hint=f"name a known benchmark, or give its file: "
                                             f"--config.eval.paths.{name}=FILE.jsonl"))
    return problems + check_lengths(config, "eval")


def _check_sft(config: Any, args: Any) -> list[StatJaxError]:
    problems = check_model_dir(config.model, "stat-jax sft", chat_template=True)  # SFT renders chats
    if not config.data.train_files and not config.data.dataset:
        problems.append(ConfigError("sft has no training data: data.train_files and data.dataset are empty",
                                    hint="pass --config.data.train_files=FILE.jsonl (records {prompt, response})"))
    problems += check_sft_files(config.data.train_files, "data.train_files")
    problems += check_lengths(config, "sft")
    return problems + check_checkpoints(Path(config.workdir), bool(getattr(args, "resume", False)))


def _check_grpo(config: Any, args: Any) -> list[StatJaxError]:
    problems = check_rollout_settings(config.rollout) + check_model_dir(
        config.model, "stat-jax grpo", chat_template=bool(config.eval.use_chat_template))
    if not config.grpo.train_files:
        problems.append(ConfigError("grpo has no prompts: grpo.train_files is empty",
                                    hint="pass --config.grpo.train_files=FILE.jsonl (rows {problem, answer})"))
    for f in config.grpo.train_files:
        if not Path(f).expanduser().exists():
            problems.append(DataError(f"grpo.train_files: {f}: no such file or directory"))
    problems += check_lengths(config, "grpo")
    return problems + check_checkpoints(Path(config.workdir), bool(getattr(args, "resume", False)))


def _check_serve(config: Any, args: Any) -> list[StatJaxError]:
    return check_model_dir(config.model, "stat-jax serve") + check_lengths(config, "serve")


def _check_run(config: Any, args: Any) -> list[StatJaxError]:
    """Only the stages this run will actually execute (not up to date) are checked."""
    from stat_jax.stat import pipeline

    try:
        stages = pipeline.stages_to_run(config, getattr(args, "only", None))
    except ValueError as e:
        return [ConfigError(str(e))]
    pending = [s for s in stages if not _stage_up_to_date(pipeline, config, s) or getattr(args, "only", None)]
    names = {s.name for s in pending}
    problems: list[StatJaxError] = []
    if "rollout" in names:
        problems += check_rollout_settings(config.rollout)
    if names & set(STUDENT_STAGES):
        problems += check_model_dir(config.model, f"stage {sorted(names & set(STUDENT_STAGES))[0]!r}",
                                    chat_template="sft" in names or bool(config.eval.use_chat_template))
    s = config.stat
    if "data" in names:
        for bench, source, key in ((s.train_benchmark, s.train_source, "stat.train_source"),
                                   (s.heldout_benchmark, s.heldout_source, "stat.heldout_source")):
            if source and is_local(source):
                problems += check_benchmark_file(bench, source, key)
    if "sft" in names:
        problems += check_sft_files(config.data.train_files, "data.train_files")
    teacher_stages = sorted(st.name for st in pending if st.uses_teacher)
    if teacher_stages:
        problems += [_with_key(p, f"stages {', '.join(teacher_stages)}")
                     for p in check_teacher_credentials(config.teacher)]
    return problems + check_lengths(config, "run")


def _stage_up_to_date(pipeline: Any, config: Any, stage: Any) -> bool:
    """The stage's manifest matches (it will be skipped), as run_stage decides; False when unsure."""
    run_dir = Path(config.stat.run_dir or Path(config.workdir) / "stat")
    if not (run_dir / stage.name / pipeline.io.MANIFEST).exists():
        return False
    try:
        ctx = pipeline.StageContext(config, run_dir)
        inputs = pipeline._inputs_for(stage, ctx)
        return pipeline.io.stage_is_done(run_dir, stage.name, config, inputs, ctx.context_values(), stage.outputs)
    except Exception as e:  # noqa: BLE001  (a check must never stop a run; the stage itself will report)
        log.debug("preflight: could not tell whether stage %s is done: %s", stage.name, e)
        return False


CHECKS: dict[str, Callable[[Any, Any], Iterable[StatJaxError]]] = {
    "eval": _check_eval,
    "sft": _check_sft,
    "grpo": _check_grpo,
    "serve": _check_serve,
    "run": _check_run,
}
