"""`stat-jax` run as a user runs it (a subprocess): each kind of intended error ends the command with one line
`stat-jax <command>: <what is wrong> — <what to do>`, its own exit status and no traceback; the input checks
list every problem before any heavy work; output to a file has no progress-bar frames.

Every command here fails in the input checks or early in a stage, so each costs about one Python + JAX start.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stat_jax import errors

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        env.pop(key, None)
    # One CPU device, as on a user's machine (the suite's conftest asks for 8 fake ones).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def stat_jax(*argv: str, env: dict[str, str] | None = None, stderr=subprocess.PIPE, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "stat_jax.cli", *argv], cwd=REPO, env=env or _env(),
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout)


def assert_one_line_error(proc, command: str, exit_code: int, *fragments: str) -> str:
    """The command ended with status `exit_code` and its last stderr line is the error, with a hint."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == exit_code, f"exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stat-jax {command}: ") and " — " in last, last
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


# ----- fixtures: a tiny real checkpoint and data files ---------------------------------------------------
# `student` (a tiny random Llama as an HF directory) is tests/conftest.py's.
def _math_rows(start: int, n: int) -> str:
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"It is $\\boxed{{{2 * i}}}$.", "answer": str(2 * i),
             "subject": "Algebra", "level": "Level 1", "unique_id": f"q{i}"} for i in range(start, start + n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    files = {"train": root / "train.jsonl", "heldout": root / "heldout.jsonl", "sft": root / "sft.jsonl",
             "bad": root / "bad.jsonl"}
    files["train"].write_text(_math_rows(0, 3))
    files["heldout"].write_text(_math_rows(100, 2))
    files["sft"].write_text(json.dumps({"prompt": "What is 1 + 1?", "response": "\\boxed{2}"}) + "\n")
    files["bad"].write_text('{"problem": "What is 1 + 1?", "answer": \n' + _math_rows(0, 1))
    return files


# ----- one test per kind -----------------------------------------------------------------------------------
def test_config_error(tmp_path):
    proc = stat_jax("eval", "--config=configs/eval_tiny.py", "--config.eval.limit=ten")
    assert_one_line_error(proc, "eval", errors.EXIT_CONFIG, "--config.eval.limit='ten'", "integer")


def test_missing_model_dir_is_reported_before_the_data_is_loaded(tmp_path):
    # The example: this used to download MATH-500 first and die in a dataset traceback. Without any
    # offline flag, the benchmark would be fetched from the hub if the data were loaded first.
    env = _env()
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        env.pop(key, None)
    proc = stat_jax("eval", "--config=configs/eval_tiny.py", "--config.model.path=/nonexistent/dir", env=env)
    assert_one_line_error(proc, "eval", errors.EXIT_MODEL, "/nonexistent/dir does not exist",
                          "--config.model.path=")
    assert "math500" not in proc.stderr.lower() and "dataset" not in proc.stderr.lower()


def test_import_gguf_error(tmp_path):
    proc = stat_jax("import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out"))
    assert_one_line_error(proc, "import-gguf", errors.EXIT_MODEL, "nope.gguf does not exist", "GGUF file")
    assert not (tmp_path / "out").exists()


def test_tokenizer_error(tmp_path, student):
    no_tokenizer = tmp_path / "student"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tokenizer / f).symlink_to(student / f)
    proc = stat_jax("eval", "--config=configs/eval_tiny.py", f"--config.model.path={no_tokenizer}")
    assert_one_line_error(proc, "eval", errors.EXIT_TOKENIZER, str(no_tokenizer), "tokenizer")


def test_data_error_names_file_and_line(student, data):
    proc = stat_jax("eval", "--config=configs/eval_tiny.py", f"--config.model.path={student}",
                    f"--config.eval.paths.math500={data['bad']}", "--config.eval.on_bad_row=error")
    assert_one_line_error(proc, "eval", errors.EXIT_DATA, f"{data['bad']}:1", "invalid JSON")


def test_workdir_with_checkpoints_needs_resume(tmp_path, student, data):
    workdir = tmp_path / "sft"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    proc = stat_jax("sft", "--config=configs/sft_tiny.py", f"--config.model.path={student}",
                    f"--config.data.train_files={data['sft']}", f"--config.workdir={workdir}")
    assert_one_line_error(proc, "sft", errors.EXIT_WORKDIR, "latest step 3", "--resume")


def test_teacher_credentials_are_checked_for_teacher_stages(tmp_path):
    proc = stat_jax("run", "--config=configs/base.py", "--config.stat.stages=skills,label",
                    f"--config.workdir={tmp_path / 'run'}")
    assert_one_line_error(proc, "run", errors.EXIT_TEACHER, "stages label, skills", "GEMINI_API_KEY",
                          "export GEMINI_API_KEY=")
    assert not (tmp_path / "run").exists()  # stopped before anything was written


# The data stage profiles on the whole (tiny) held-out file: no validation split, no benchmark excluded from it.
HELDOUT_AS_IS = ("--config.stat.heldout_size=0", "--config.stat.heldout_exclude=")

TEACHER = '''
import json
from stat_jax.teacher.base import TeacherBackend, TeacherResponse

class Teacher(TeacherBackend):
    """A stand-in for Gemini answering the skill tasks; what is tested is the call budget and the progress."""
    backend_id = "cli-test-teacher"

    def complete(self, request, *, reask_error=None):
        skill = {"name": "doubling", "description": "adds a number to itself"}
        if request.task == "label_skills":  # the catalog's name for it (qualified by the subject)
            answer = {"skills": request.schema["properties"]["skills"]["items"]["enum"][:1]}
        else:
            answer = {"propose_skills": {"skills": [skill]}, "merge_skills": {"skills": [skill]}}[request.task]
        return TeacherResponse(json.dumps(answer), input_tokens=10, output_tokens=10)
'''


def _teacher_run(tmp_path: Path, data, stages: str, *more: str) -> tuple[list[str], dict[str, str]]:
    (tmp_path / "cli_test_teacher.py").write_text(TEACHER)
    argv = ["run", "--config=configs/base.py", f"--config.stat.stages={stages}",
            f"--config.stat.train_source={data['train']}", f"--config.stat.heldout_source={data['heldout']}",
            *HELDOUT_AS_IS, "--config.teacher.backend=cli_test_teacher:Teacher", "--config.teacher.max_workers=1",
            f"--config.workdir={tmp_path / 'run'}", *more]
    return argv, _env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")


def test_budget_stop_and_resolved_config(tmp_path, data):
    argv, env = _teacher_run(tmp_path, data, "data,skills", "--config.teacher.max_calls=1")
    proc = stat_jax(*argv, env=env)
    assert_one_line_error(proc, "run", errors.EXIT_BUDGET, "teacher.max_calls=1", "--resume")
    # The data stage ran; the resolved config (overrides applied) is in the workdir, as --print-config shows it.
    assert (tmp_path / "run/stat/data/train.jsonl").exists()
    printed = stat_jax(*argv, "--print-config", env=env)
    assert printed.returncode == 0, printed.stderr[-2000:]
    resolved = json.loads(printed.stdout)
    assert resolved["teacher"]["max_calls"] == 1 and resolved["stat"]["stages"] == ["data", "skills"]
    assert json.loads((tmp_path / "run/config.json").read_text()) == resolved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rollout_error(tmp_path, student, data):
    proc = stat_jax("run", "--config=configs/base.py", "--config.stat.stages=data,rollout",
                    f"--config.stat.train_source={data['train']}", f"--config.stat.heldout_source={data['heldout']}",
                    *HELDOUT_AS_IS, f"--config.model.path={student}", "--config.model.dtype=float32", "--config.mesh.fsdp=1",
                    "--config.rollout.backend=client", f"--config.rollout.address=127.0.0.1:{_free_port()}",
                    "--config.rollout.client_retries=0", "--config.stat.rollout_samples=1",
                    "--config.stat.rollout_max_new_tokens=8",
                    f"--config.workdir={tmp_path / 'run'}")
    assert_one_line_error(proc, "run", errors.EXIT_ROLLOUT, "unreachable", "stat-jax serve")


def test_several_problems_are_listed_at_once(tmp_path):
    missing = tmp_path / "math500.jsonl"
    proc = stat_jax("eval", "--config=configs/eval_tiny.py", "--config.model.path=/nonexistent/dir",
                    f"--config.eval.paths.math500={missing}", "--config.rollout.backend=client")
    assert "Traceback" not in proc.stderr and proc.returncode == errors.EXIT_INPUTS, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stat-jax eval: 3 problems"))
    problems = lines[header + 1:]
    assert len(problems) == 3 and all(line.startswith("  - ") and " — " in line for line in problems)
    assert "rollout.address" in problems[0] and "/nonexistent/dir" in problems[1] and str(missing) in problems[2]


def test_debug_log_level_keeps_the_traceback():
    proc = stat_jax("eval", "--config=configs/eval_tiny.py", "--config.model.path=/nonexistent/dir",
                    "--log-level=DEBUG")
    assert proc.returncode == errors.EXIT_MODEL
    assert "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("stat-jax eval: ")


# ----- output to a file ---------------------------------------------------------------------------------
def test_progress_to_a_file_is_lines_not_frames(tmp_path, data):
    # `make demo > log 2>&1`-style: stderr is a real file. The teacher stages show a progress bar per batch
    # of requests; in a file each must be plain lines (interval 0: a line per update), never \\r frames.
    argv, env = _teacher_run(tmp_path, data, "data,skills,label")
    env["STAT_JAX_PROGRESS_INTERVAL"] = "0"
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = stat_jax(*argv, env=env, stderr=f)
    text = log.read_bytes().decode()  # read_text() would turn \r into \n
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text
    label = [line for line in text.splitlines() if line.startswith("label skills: ")]
    assert label[-1].startswith("label skills: 3/3 req (100%)"), text[-3000:]
    assert len(label) >= 2  # the start and the end at least, each its own line
