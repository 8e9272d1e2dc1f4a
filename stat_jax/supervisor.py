"""One thin parent process per host for a multi-process command, so that the death of process 0 gets an error
naming its host.

Process 0 runs JAX's coordination service. When it dies, jaxlib ends every other process from C++ the moment
the service's socket closes, with a message about "the leader task" that names no host, and nothing inside
the process can add to it (jaxlib 0.10's missed-heartbeat callback dies converting its status). So on a
multi-process job `stat-jax COMMAND` starts the command as its child and waits: the child writes the peer table
(every process's host and pid) to a file once it has joined the job, and when it ends abnormally while the
coordinator no longer answers, this parent prints which process and host went away. It imports no JAX.

The child dies with the parent (a killed `stat-jax` leaves no orphan holding the devices); SIGTERM and SIGHUP
are passed on (SIGTERM is the preemption signal the trainers checkpoint on); Ctrl-C reaches the child directly,
which shares the terminal's process group. The pid in the peer table is this parent's: the command's pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHILD_ENV = "STAT_JAX_SUPERVISOR_PID"  # set in the child: the parent's pid (the command's own)
PEER_FILE_ENV = "STAT_JAX_PEER_FILE"  # where the child writes the peer table
FORWARDED = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def is_supervised(env: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if env is None else env).get(CHILD_ENV))


def command_pid() -> int:
    """The pid a user sees for this command: the supervising parent's, else this process's."""
    return int(os.environ.get(CHILD_ENV) or os.getpid())


def write_peer_table(index: int, peers: Mapping[int, str], coordinator: str | None) -> None:
    """Called in the child once every process has published its host: what the parent needs after a crash."""
    path = os.environ.get(PEER_FILE_ENV)
    if not path:
        return
    record = {"process": index, "peers": {str(k): v for k, v in sorted(peers.items())}, "coordinator": coordinator}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _death_signal_setter(parent: int):
    """What the child runs between fork and exec: the kernel is to send it SIGKILL when the parent dies (Linux;
    elsewhere nothing). libc's prctl is looked up here, in the parent: after a fork only calls are safe, not
    imports (another thread may have held the import lock)."""
    prctl = None
    with contextlib.suppress(Exception):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return in_child


def coordinator_answers(address: str | None, timeout_s: float = 3.0) -> bool | None:
    """Whether HOST:PORT accepts a TCP connection; None without an address."""
    if not address or ":" not in address:
        return None
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _describe(peers: Mapping[str, str], index: int) -> str:
    return f"process {index} ({peers[str(index)]})" if str(index) in peers else f"process {index}"


def failure_message(returncode: int, table: dict[str, Any] | None, coordinator_up: bool | None) -> str | None:
    """The error the parent prints after its child ended with `returncode`, or None when the child's own
    output already says what happened (it exited with a status of its own while the coordinator answers)."""
    signalled = returncode < 0
    how = f"was ended by {signal.Signals(-returncode).name}" if signalled else f"exited with status {returncode}"
    if table is None:
        return (f"the command {how} before it joined the job (see its last messages above)" if signalled else None)
    peers, me = table["peers"], int(table["process"])
    if me != 0 and coordinator_up is False:
        return (f"{_describe(peers, me)} {how}: the coordinator, {_describe(peers, 0)}, is gone (its coordination "
                f"service at {table['coordinator']} refuses connections), and JAX ends every process that loses it "
                f"(the 'leader task' message above). It or its host is down. Every process of the job stops; "
                f"restart it and rerun the same command on every host with --resume")
    if signalled:
        return (f"{_describe(peers, me)} {how} (see its last messages above); the job's processes: "
                + ", ".join(_describe(peers, int(i)) for i in sorted(peers, key=int)))
    return None


def supervise(argv: Sequence[str], format_error, child_command: Sequence[str] | None = None) -> int:
    """Runs `python -m stat_jax.cli ARGV` (or `child_command`) as a child and returns its exit status (128 + N
    for signal N)."""
    fd, peer_file = tempfile.mkstemp(prefix="stat-jax-peers-", suffix=".json")
    os.close(fd)
    os.unlink(peer_file)  # written (atomically) by the child once it has the whole table
    parent = os.getpid()
    env = {**os.environ, CHILD_ENV: str(parent), PEER_FILE_ENV: peer_file}
    command = list(child_command) if child_command else [sys.executable, "-m", "stat_jax.cli", *argv]
    child = subprocess.Popen(command, env=env,
                             preexec_fn=_death_signal_setter(parent))
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets the terminal's own
    try:
        returncode = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    table = None
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(Path(peer_file).read_text())
    with contextlib.suppress(OSError):
        os.unlink(peer_file)
    if returncode == 0 or (returncode < 0 and -returncode in received):
        return returncode if returncode >= 0 else 128 - returncode
    up = coordinator_answers(table["coordinator"]) if table and int(table["process"]) != 0 else None
    message = failure_message(returncode, table, up)
    if message:
        from stat_jax.errors import StatJaxError

        print(format_error(argv[0] if argv else "", StatJaxError(message)), file=sys.stderr, flush=True)
    return returncode if returncode >= 0 else 128 - returncode
