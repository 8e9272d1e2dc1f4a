"""Generation on a multi-process mesh: 2 local CPU processes x 4 fake devices joined by jax.distributed on
127.0.0.1 run `stat-jax eval` and `stat-jax grpo` through the CLI; every process runs the same scheduler loop
over the same requests, and what process 0 alone writes equals the run of this single process on 8 devices.
A process killed mid-rollout ends the other with an error naming it; `--resume` then completes the records."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from stat_jax import cli
from tests.train.sft_fixtures import make_student

REPO = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_PER_PROCESS = 2, 4


def start_processes(command: str, argv_for, logs: list[Path]) -> list[subprocess.Popen]:
    """`stat-jax COMMAND` on PROCESSES local processes; `argv_for(i)` gives process i's own arguments."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    procs = []
    for i in range(PROCESSES):
        argv = [sys.executable, "-m", "stat_jax.cli", command, *argv_for(i),
                f"--coordinator-address=127.0.0.1:{port}", f"--num-processes={PROCESSES}", f"--process-id={i}"]
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=logs[i].open("w"), stderr=subprocess.STDOUT))
    return procs


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_all(procs, logs, timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        stop_all(procs)


def tail(logs) -> str:
    return "\n\n".join(f"{log}:\n{log.read_text()[-3000:]}" for log in logs)


def write_math500(path: Path, n: int) -> Path:
    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "solution": f"$\\boxed{{{2 * i}}}$",
             "subject": "Algebra", "level": 1 + i % 2, "unique_id": f"test/algebra/{i}.json"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_args(student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # Greedy only, one chunk, 8 new tokens: one prefill and one generate shape to compile, so the test stays
    # short; 5 prompts on 8 slots pad the prefill rows and leave slots empty, which every process must agree on.
    return ["--config=configs/eval_tiny.py", f"--config.model.path={student}", f"--config.eval.paths.math500={data}",
            f"--config.eval.out_dir={out}", f"--config.workdir={out.parent / (out.name + '_workdir')}",
            "--config.eval.num_samples=0", "--config.eval.chunk_size=8", *extra]


def test_two_process_greedy_eval_writes_the_single_process_records_once(tmp_path):
    student = make_student(tmp_path / "student")
    data = write_math500(tmp_path / "math500.jsonl", 5)
    multi, elsewhere, single = tmp_path / "multi", tmp_path / "process1_out", tmp_path / "single"
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    # Process 1 is pointed at another directory: it must write nothing there (process 0 writes every file).
    procs = start_processes("eval", lambda i: eval_args(student, data, multi if i == 0 else elsewhere), logs)
    try:
        # The reference: this process alone on 8 devices, the same config.
        assert jax.device_count() == PROCESSES * DEVICES_PER_PROCESS
        assert cli.main(["eval", *eval_args(student, data, single)]) == 0
    finally:
        codes = wait_all(procs, logs, timeout=300)
    assert codes == [0] * PROCESSES, tail(logs)
    assert "process 1 of 2: 4 local / 8 global devices" in logs[1].read_text()
    assert not elsewhere.exists() and not (tmp_path / "process1_out_workdir").exists()
    assert (multi / "math500.jsonl").read_text() == (single / "math500.jsonl").read_text()
    records = [json.loads(line) for line in (multi / "math500.jsonl").read_text().splitlines()]
    assert len(records) == 5 and any(r["greedy"]["response"] for r in records)  # the random student wrote text
    for name in ("math500.settings.json", "math500.summary.json", "summary.json"):
        multi_json, single_json = json.loads((multi / name).read_text()), json.loads((single / name).read_text())
        for d in (multi_json, single_json, *multi_json.get("benchmarks", {}).values(),
                  *single_json.get("benchmarks", {}).values()):
            d.pop("seconds", None)  # wall time: the only field allowed to differ
        assert multi_json == single_json, name


def test_serve_refuses_several_processes_with_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_PROCESS_COUNT", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    code = cli.main(["serve", "--config=configs/serve_tiny.py", f"--config.model.path={tmp_path / 'none'}",
                     f"--config.workdir={tmp_path / 'serve'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "stat-jax serve is a single-host server" in err and "run it as one process on one host" in err
    assert not (tmp_path / "serve").exists()  # refused before its inputs are checked or anything is written


GRPO_LEARNING_RATE = 1e-5  # the top of the configs' GRPO rates (the paper's is 5e-7)


def grpo_args(student: Path, problems: Path, workdir: Path) -> list[str]:
    # The toy task of tests/train/test_grpo.py: rewards differ within groups, so the two updates move the weights.
    # The processes sum gradients in another order than one process does, and Adam, which moves every weight by
    # about lr whatever its gradient's size, turns the last-bit differences of a near-zero gradient into weight
    # differences proportional to lr: 2.0e-3 x lr in one embedding entry at 1e-5, 1e-4 and 2e-3 alike (3.7e-6 at
    # 2e-3, 2.0e-8 here; losses and rewards equal).
    return ["--config=configs/grpo_tiny.py", f"--config.model.path={student}", f"--config.workdir={workdir}",
            f"--config.grpo.train_files={problems}", "--config.grpo.steps=2", "--config.grpo.prompts_per_step=4",
            "--config.grpo.num_generations=8", "--config.grpo.max_new_tokens=2",
            f"--config.grpo.learning_rate={GRPO_LEARNING_RATE}", "--config.grpo.instruction={problem}",
            "--config.grpo.checkpoint_every=2",
            "--config.grpo.reward=tests.train.test_grpo:even_digit_reward"]


def test_two_process_grpo_steps_equal_the_single_process_run(tmp_path):
    from safetensors.numpy import load_file

    from stat_jax.train.metrics import read_metrics

    student = make_student(tmp_path / "student")
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"Say an even digit ({i}).", "answer": "0"}) + "\n"
                                for i in range(8)))
    multi, single = tmp_path / "multi", tmp_path / "single"
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    procs = start_processes("grpo", lambda i: grpo_args(student, problems, multi), logs)
    try:
        assert cli.main(["grpo", *grpo_args(student, problems, single)]) == 0
    finally:
        codes = wait_all(procs, logs, timeout=400)
    assert codes == [0] * PROCESSES, tail(logs)
    multi_rows, single_rows = read_metrics(multi / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [r["step"] for r in multi_rows] == [1, 2]  # written once, by process 0
    for a, b in zip(multi_rows, single_rows):
        assert a["reward_mean"] == b["reward_mean"] and 0 < a["reward_mean"] < 1
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    start, after_multi, after_single = (load_file(d / "model.safetensors") for d in (student, multi / "hf", single / "hf"))
    assert after_multi.keys() == after_single.keys() == start.keys()
    tolerance = 1e-6
    for name in start:
        np.testing.assert_allclose(after_multi[name], after_single[name], rtol=0, atol=tolerance, err_msg=name)
    # The steps moved the weights, by far more than the tolerance: two Adam steps move a weight by up to 2 x lr
    # (seen: 2.0e-5 at most, 1.8e-5 for the median entry), so a step that did nothing cannot pass.
    moved = np.concatenate([np.abs(after_multi[name] - start[name]).ravel() for name in start])
    assert moved.max() > 15 * tolerance and np.median(moved) > 5 * tolerance, (moved.max(), np.median(moved))


# 48 new tokens a question in chunks of 4: long enough to kill a process during the rollout of a later chunk.
KILL_EXTRA = ("--config.eval.chunk_size=4", "--config.eval.max_new_tokens=48", "--config.rollout.max_target_length=320")
# Short limits for the run that loses a process; a resumed run keeps the defaults, since on a loaded test machine
# a short heartbeat limit can expire for processes that are merely slow.
KILL_LIMITS = ("--config.distributed.heartbeat_timeout_s=30", "--config.distributed.collective_timeout_s=240")


def _eval_then_kill(student: Path, data: Path, out: Path, logs: list[Path], victim: int) -> tuple[int, int, float]:
    """2-process eval of 12 questions; process `victim` is killed once the second chunk starts (in its rollout,
    or on a fast machine the third's). (survivor's exit status, killed pid, seconds the survivor took to stop)."""
    procs = start_processes("eval", lambda i: eval_args(student, data, out, *KILL_EXTRA, *KILL_LIMITS), logs)
    try:
        deadline = time.monotonic() + 400
        while "questions 4-8 of 12" not in logs[0].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), tail(logs)
            time.sleep(0.5)
        procs[victim].kill()
        killed_pid, start = procs[victim].pid, time.monotonic()
        code = procs[1 - victim].wait(timeout=300)
        return code, killed_pid, time.monotonic() - start
    finally:
        stop_all(procs)


# 34 s on the idle 2-core machine (373 s when it was shared and loaded)
def test_a_process_killed_mid_rollout_ends_the_other_naming_it_and_resume_completes(tmp_path):
    """A host lost mid-rollout: the survivor stops with an error naming the lost process (its host and pid)
    within the configured limits instead of hanging, and `--resume` on both finishes the same records."""
    student = make_student(tmp_path / "student")
    data = write_math500(tmp_path / "math500.jsonl", 12)
    multi, single = tmp_path / "multi", tmp_path / "single"
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    code, killed_pid, stopped_after = _eval_then_kill(student, data, multi, logs, victim=1)
    survivor = logs[0].read_text()
    assert code != 0, survivor[-3000:]
    # Named by stat-jax's peer watch (host and pid), before JAX's own heartbeat check (twice as late) could abort
    # it with a task number only.
    assert f"process 1 ({socket.gethostname()}, pid {killed_pid}) stopped responding" in survivor, survivor[-3000:]
    assert "Terminating process because the JAX distributed service" not in survivor, survivor[-3000:]
    assert stopped_after < 240, stopped_after  # within the configured limits, not a hang
    written = len((multi / "math500.jsonl").read_text().splitlines())
    assert written in (4, 8), written  # the chunks finished before the kill, not the one it interrupted

    logs = [tmp_path / f"resume-{i}.log" for i in range(PROCESSES)]
    procs = start_processes("eval", lambda i: [*eval_args(student, data, multi, *KILL_EXTRA), "--resume"], logs)
    try:
        assert cli.main(["eval", *eval_args(student, data, single, *KILL_EXTRA)]) == 0
    finally:
        codes = wait_all(procs, logs, timeout=400)
    assert codes == [0] * PROCESSES, tail(logs)
    assert f"resuming after {written}/12 questions" in logs[0].read_text()
    assert (multi / "math500.jsonl").read_text() == (single / "math500.jsonl").read_text()


def test_the_coordinator_killed_mid_rollout_stops_the_survivor_at_once_naming_its_host(tmp_path):
    """Process 0 (JAX's coordinator, which runs the coordination service) lost mid-rollout: process 1 does not
    hang. jaxlib's error poll fails the moment the service's socket closes and aborts the process with its own
    message, which names no host (a callback of our own cannot replace it: jaxlib 0.10's missed-heartbeat
    callback dies converting its status, std::bad_cast); the parent process the command runs under
    (stat_jax.supervisor) then names process 0's host and pid from the peer table."""
    student = make_student(tmp_path / "student")
    data = write_math500(tmp_path / "math500.jsonl", 12)
    logs = [tmp_path / f"process-{i}.log" for i in range(PROCESSES)]
    code, killed_pid, stopped_after = _eval_then_kill(student, data, tmp_path / "multi", logs, victim=0)
    survivor = logs[1].read_text()
    assert code != 0 and stopped_after < 30, (code, stopped_after, survivor[-3000:])  # at once, not a hang
    assert f"peers: process 0 ({socket.gethostname()}, pid {killed_pid})" in survivor, survivor[-3000:]
    assert "the leader task was preempted/died" in survivor, survivor[-3000:]
    assert (f": the coordinator, process 0 ({socket.gethostname()}, pid {killed_pid}), is gone (its coordination "
            "service at 127.0.0.1:") in survivor.splitlines()[-1], survivor[-3000:]
    assert survivor.splitlines()[-1].startswith("stat-jax eval: process 1 ("), survivor[-3000:]