"""`stat-jax --version`, per-command `--help`, `--print-config`, the error line format and the progress helper
(in-process: cheap)."""

import io
import json

import pytest

from stat_jax import __version__, cli, errors
from stat_jax.progress import LineStream, progress_bar, progress_mode


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stat-jax {__version__}"


def test_each_command_help_lists_its_own_flags_and_config_sections(capsys):
    helps = {}
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps[command] = capsys.readouterr().out
    assert len(set(helps.values())) == len(helps)  # no two commands print the same text
    assert "--resume" in helps["eval"] and "--dry-run" in helps["eval"] and "--quick" not in helps["eval"]
    assert "--quick" in helps["demo"] and "--only" in helps["run"] and "--only" not in helps["sft"]
    assert "config sections read: seed, workdir, model, mesh, data, train" in helps["sft"]
    assert "teacher" in helps["run"].split("config sections read:")[1].splitlines()[0]
    for text in helps.values():
        assert "--print-config" in text and "--log-level" in text


def test_flags_of_another_command_are_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--config=configs/sft_tiny.py", "--quick"])
    assert e.value.code == 2 and "--quick" in capsys.readouterr().err


def test_print_config_shows_the_overrides_and_runs_nothing(tmp_path, capsys):
    workdir = tmp_path / "never"
    assert cli.main(["eval", "--config=configs/eval_tiny.py", "--config.eval.limit=7",
                     "--config.model.path=/nonexistent/dir", f"--config.workdir={workdir}", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval"]["limit"] == 7 and printed["eval"]["max_new_tokens"] == 8  # override + config file
    assert printed["workdir"] == str(workdir) and not workdir.exists()  # no input checks, nothing written


def test_demo_print_config_resolves_quick(capsys):
    assert cli.main(["demo", "--print-config"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert cli.main(["demo", "--quick", "--print-config"]) == 0
    quick = json.loads(capsys.readouterr().out)
    assert quick != full and quick["demo"]["seeds"] != full["demo"]["seeds"]


def test_error_line_format():
    e = errors.ModelNotFoundError("model directory /x does not exist")
    assert isinstance(e, FileNotFoundError) and e.exit_code == errors.EXIT_MODEL
    line = errors.format_error("eval", e)
    assert line.startswith("stat-jax eval: model directory /x does not exist — ") and "\n" not in line
    # A multi-line message is one line; a KeyError's message is not quoted.
    assert errors.format_error("sft", errors.ConfigError("a\n  b", hint="c")) == "stat-jax sft: a b — c"
    assert errors.format_error("eval", errors.ModelConfigKeyError("k missing", hint="")) == "stat-jax eval: k missing"
    several = errors.InputProblems([e, errors.DataError("f.jsonl: no such file")])
    assert several.exit_code == errors.EXIT_INPUTS
    assert errors.format_error("eval", several).splitlines()[1:] == [
        f"  - model directory /x does not exist — {errors.ModelError.hint}",
        f"  - f.jsonl: no such file — {errors.DataError.hint}"]
    # Problems of one kind keep that kind's status.
    assert errors.InputProblems([e, e]).exit_code == errors.EXIT_MODEL


def test_every_kind_has_its_own_exit_status():
    from stat_jax.rollout.base import RolloutError
    from stat_jax.teacher.base import BudgetExceeded, TeacherError

    kinds = [errors.ConfigError, BudgetExceeded, errors.DataError, errors.ModelError, errors.TokenizerError,
             TeacherError, RolloutError, errors.WorkdirError, errors.InputProblems]
    codes = [k.exit_code for k in kinds]
    assert len(set(codes)) == len(codes) and 1 not in codes
    assert issubclass(BudgetExceeded, TeacherError) and BudgetExceeded.exit_code == errors.EXIT_BUDGET


def test_progress_lines_in_a_file(monkeypatch):
    monkeypatch.delenv("STAT_JAX_PROGRESS", raising=False)
    monkeypatch.setenv("STAT_JAX_PROGRESS_INTERVAL", "0")
    out = io.StringIO()  # not a TTY
    assert progress_mode(out) == "lines"
    with progress_bar(total=4, desc="grade", unit="q", file=out, leave=False) as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(acc="0.50", refresh=False)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("grade: 0/4 q (0%)") and lines[-1].startswith("grade: 4/4 q (100%)")
    assert len(lines) == len(set(lines)) >= 3  # one line per state, none repeated (the close redraw is dropped)


def test_progress_interval_limits_the_lines(monkeypatch):
    monkeypatch.setenv("STAT_JAX_PROGRESS_INTERVAL", "3600")
    out = io.StringIO()
    for _ in progress_bar(range(1000), desc="many", file=out):
        pass
    assert [line.split(" ")[1] for line in out.getvalue().splitlines()] == ["0/1000", "1000/1000"]


def test_progress_mode_can_be_forced(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_mode(Tty()) == "bars"
    monkeypatch.setenv("STAT_JAX_PROGRESS", "lines")
    assert progress_mode(Tty()) == "lines"
    monkeypatch.setenv("STAT_JAX_PROGRESS", "off")
    out = io.StringIO()
    for _ in progress_bar(range(3), desc="quiet", file=out):
        pass
    assert out.getvalue() == ""
    line = LineStream(io.StringIO())
    assert line.isatty() is False
