"""stat_jax.supervisor: the thin parent a multi-process command runs under. It passes the child's exit status
through, forwards SIGTERM, takes the child down with it, and after an abnormal end while the coordinator no
longer answers prints the error naming process 0's host and pid from the peer table the child wrote. The
two-process kill tests (tests/test_distributed_generation.py) run it under real JAX."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from stat_jax import supervisor
from stat_jax.errors import format_error

TABLE = {"process": 1, "peers": {"0": "h0, pid 10", "1": "h1, pid 11"}, "coordinator": "127.0.0.1:1234"}


def test_the_message_names_the_coordinator_only_when_it_is_gone():
    gone = supervisor.failure_message(-6, TABLE, coordinator_up=False)
    assert gone.startswith("process 1 (h1, pid 11) was ended by SIGABRT: the coordinator, process 0 (h0, pid 10), "
                           "is gone (its coordination service at 127.0.0.1:1234 refuses connections)"), gone
    assert "--resume" in gone
    assert "exited with status 1: the coordinator, process 0 (h0, pid 10)" in supervisor.failure_message(
        1, TABLE, coordinator_up=False)
    # The coordinator answers: the child's own error said it all, unless a signal ended it.
    assert supervisor.failure_message(3, TABLE, coordinator_up=True) is None
    killed = supervisor.failure_message(-9, TABLE, coordinator_up=True)
    assert killed.startswith("process 1 (h1, pid 11) was ended by SIGKILL") and "process 0 (h0, pid 10)" in killed
    # Process 0 itself: never "the coordinator is gone".
    assert "is gone" not in supervisor.failure_message(-9, {**TABLE, "process": 0}, coordinator_up=None)
    assert "before it joined the job" in supervisor.failure_message(-6, None, None)
    assert supervisor.failure_message(2, None, None) is None


def test_coordinator_answers_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert supervisor.coordinator_answers(address) is True
    assert supervisor.coordinator_answers(address, timeout_s=1.0) is False
    assert supervisor.coordinator_answers(None) is None


def _child(body: str) -> list[str]:
    """A child that, like stat-jax under JAX, writes the peer table once it has it and then does `body`."""
    return [sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys, time
        from stat_jax import supervisor
        supervisor.write_peer_table(1, {{0: "h0, pid 10", 1: "h1, pid " + str(supervisor.command_pid())}},
                                    sys.argv[1])
        {body}
        """), "127.0.0.1:1"]  # port 1: nothing listens, the coordinator is "gone"


def test_supervise_names_the_lost_coordinator_after_jaxlib_style_abort(capfd):
    code = supervisor.supervise(["eval"], format_error, child_command=_child("os.abort()"))
    err = capfd.readouterr().err
    assert code == 128 + signal.SIGABRT
    assert (f"stat-jax eval: process 1 (h1, pid {os.getpid()}) was ended by SIGABRT: the coordinator, "
            "process 0 (h0, pid 10), is gone (its coordination service at 127.0.0.1:1 refuses connections)") in err


def test_supervise_passes_statuses_through_and_adds_nothing_to_a_clean_exit(capfd):
    assert supervisor.supervise(["eval"], format_error, child_command=[sys.executable, "-c", "exit(0)"]) == 0
    assert supervisor.supervise(["eval"], format_error, child_command=[sys.executable, "-c", "exit(3)"]) == 3
    assert capfd.readouterr().err == ""


PARENT = """
import sys
from stat_jax import supervisor
from stat_jax.errors import format_error
child = [sys.executable, "-c", '''
import os, signal, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
signal.signal(signal.SIGTERM, lambda *a: (print("child: SIGTERM, checkpointing", flush=True), sys.exit(17)))
time.sleep(120)
''', sys.argv[1]]
sys.exit(supervisor.supervise(["grpo"], format_error, child_command=child))
"""


def _start_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pid_file)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    return parent, int(pid_file.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigterm_reaches_the_child_and_a_killed_parent_takes_the_child_with_it(tmp_path):
    parent, child = _start_parent(tmp_path)
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=30)
    assert parent.returncode == 17 and "child: SIGTERM, checkpointing" in out  # the trainers' preemption path

    parent, child = _start_parent(tmp_path / "..")
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, f"child {child} outlived its killed parent"
        time.sleep(0.05)


def test_only_a_multi_process_command_runs_under_the_parent(monkeypatch, capsys):
    from stat_jax import cli

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_COUNT", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "STAT_JAX_DISTRIBUTED", supervisor.CHILD_ENV,
                "STAT_JAX_SUPERVISOR"):
        monkeypatch.delenv(var, raising=False)
    multi = ["--coordinator-address=127.0.0.1:1234", "--num-processes=2", "--process-id=1"]
    assert cli._wants_supervisor(["eval", "--config=configs/eval_tiny.py", *multi])
    assert not cli._wants_supervisor(["eval", "--config=configs/eval_tiny.py"])
    assert not cli._wants_supervisor(["serve", *multi])  # refused by the command itself, with its own error
    assert not cli._wants_supervisor(["eval", "--print-config", *multi])
    assert not cli._wants_supervisor(["--version"]) and not cli._wants_supervisor(["nonsense", "--help"])
    assert capsys.readouterr() == ("", "")  # the probe prints nothing; the command's own parse does
    monkeypatch.setenv("STAT_JAX_SUPERVISOR", "0")
    assert not cli._wants_supervisor(["eval", *multi])
    monkeypatch.delenv("STAT_JAX_SUPERVISOR")
    monkeypatch.setenv(supervisor.CHILD_ENV, "123")  # the child itself runs the command
    assert not cli._wants_supervisor(["eval", *multi])
