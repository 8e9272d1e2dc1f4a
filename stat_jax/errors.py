"""The errors stat-jax raises on purpose, one class per kind of problem, each with its own exit status.

`stat-jax <command>` (stat_jax/cli.py) catches `StatJaxError` once and ends with one line,
`stat-jax <command>: <what is wrong> — <what to do>`, and the class's `exit_code`; the traceback is shown
only with `--log-level=DEBUG`. Anything else is a bug and keeps its traceback (exit status 1).

The modules' own classes (`DatasetError`, `CheckpointError`, `TeacherError`, ...) derive from the kinds
here *and* keep their historic builtin base (`ValueError`, `RuntimeError`, `FileNotFoundError`), so code and
tests that catch the builtin still work.
"""

from __future__ import annotations

import re

# Exit statuses, one per kind. 1 stays Python's "unexpected exception", 2 is argparse's usage error (a bad
# config is the same kind of mistake), 3 was already `stat-jax run`'s "teacher budget spent" status, and
# 143 (128 + SIGTERM) is a trainer that checkpointed and stopped on SIGTERM.
EXIT_CONFIG = 2
EXIT_BUDGET = 3
EXIT_DATA = 4
EXIT_MODEL = 5
EXIT_TOKENIZER = 6
EXIT_TEACHER = 7
EXIT_ROLLOUT = 8
EXIT_WORKDIR = 9
EXIT_INPUTS = 10  # several problems found by the input checks, of different kinds


class StatJaxError(Exception):
    """Base of every intended error: `str(e)` says what is wrong, `hint` what to do about it."""

    exit_code = 1
    hint = ""

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class ConfigError(StatJaxError, ValueError):
    """A config file or an override is invalid; the message says which and how to fix it."""

    exit_code = EXIT_CONFIG
    hint = "fix the config file or the --config.* override (`--print-config` shows the resolved values)"


class DataError(StatJaxError):
    """A data file, dataset or one of its rows is missing or malformed."""

    exit_code = EXIT_DATA
    hint = "fix or replace the data file, or point the config at another one"


class ModelError(StatJaxError):
    """A model directory / checkpoint is missing, incomplete or describes an unsupported model."""

    exit_code = EXIT_MODEL
    hint = "pass --config.model.path=DIR of a Hugging Face checkpoint (config.json, tokenizer, *.safetensors)"


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model directory (or a file it must hold) does not exist."""


class ModelFileError(ModelError, ValueError):
    """A file of the model directory is unreadable (config.json not JSON, a broken safetensors index, ...)."""


class ModelConfigKeyError(ModelError, KeyError):
    """config.json lacks a key the model needs."""


class TokenizerError(StatJaxError):
    """The tokenizer cannot be loaded or lacks what stat-jax needs (EOS, chat template)."""

    exit_code = EXIT_TOKENIZER
    hint = "use the checkpoint's own tokenizer files, or set --config.model.tokenizer_path=DIR"


class TeacherFailure(StatJaxError):
    """Kind of `stat_jax.teacher.base.TeacherError`: the teacher LLM cannot be reached or answered badly."""

    exit_code = EXIT_TEACHER
    hint = "check the teacher settings (config.teacher) and credentials; answers so far are cached, re-run"


class BudgetFailure(StatJaxError):
    """Kind of `stat_jax.teacher.base.BudgetExceeded`: the teacher call/token budget is spent (resumable)."""

    exit_code = EXIT_BUDGET
    hint = "raise --config.teacher.max_calls / max_tokens and re-run with --resume (paid answers are cached)"


class RolloutFailure(StatJaxError):
    """Kind of `stat_jax.rollout.base.RolloutError`: generating student rollouts failed."""

    exit_code = EXIT_ROLLOUT
    hint = "check the config.rollout limits and, for rollout.backend=client, that `stat-jax serve` is up"


class WorkdirError(StatJaxError):
    """The workdir's state does not fit the command (checkpoints without --resume, a foreign run, ...)."""

    exit_code = EXIT_WORKDIR
    hint = "pass --resume to continue the run in that workdir, or choose another --config.workdir"


class CheckpointsExistError(WorkdirError, FileExistsError):
    """The workdir already holds a run's checkpoints and --resume was not given."""


class RunStateMissingError(WorkdirError, FileNotFoundError):
    """A stage needs files an earlier stage writes, and they are not in the run directory."""

    hint = "run the earlier stages first (or drop --only), or point the config at the run that has them"


class InputProblems(StatJaxError):
    """Several problems found by the input checks before any heavy work; all are listed."""

    exit_code = EXIT_INPUTS
    hint = "fix them and run again"

    def __init__(self, problems: list[StatJaxError]):
        self.problems = list(problems)
        codes = {p.exit_code for p in self.problems}
        if len(codes) == 1:  # all of one kind: that kind's status, so scripts can still tell them apart
            self.exit_code = codes.pop()
        super().__init__(f"{len(self.problems)} problems with the inputs")


def one_line(text: str) -> str:
    """Collapses a (possibly multi-line) message into one line."""
    return re.sub(r"\s+", " ", str(text)).strip()


def format_error(command: str, error: StatJaxError) -> str:
    """`stat-jax <command>: <what is wrong> — <what to do>`; several input problems get one line each."""
    prefix = f"stat-jax {command}" if command else "stat-jax"
    if isinstance(error, InputProblems):
        lines = [f"{prefix}: {error} — {error.hint}:"]
        lines += [f"  - {_what_and_what_to_do(p)}" for p in error.problems]
        return "\n".join(lines)
    return f"{prefix}: {_what_and_what_to_do(error)}"


def _what_and_what_to_do(error: BaseException) -> str:
    # str(KeyError("msg")) is "'msg'": use the message itself.
    what = one_line(error.args[0] if isinstance(error, KeyError) and error.args else error) or type(error).__name__
    hint = one_line(getattr(error, "hint", "") or "")
    return f"{what} — {hint}" if hint else what
