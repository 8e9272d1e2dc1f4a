"""A peer killed on a multi-process job: the survivor's error names the dead process's host and pid, never only
JAX's task number. 2 local CPU processes joined by jax.distributed on 127.0.0.1, through
`stat_jax.distributed.maybe_initialize_distributed` as every command starts them."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import portpicker

from stat_jax.distributed import COLLECTIVE_TIMEOUT_STATUS

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10  # the peer watch then speaks after 10 s, JAX's coordination service after 20 s

PROGRAM = """
import logging, sys
from stat_jax import distributed
logging.basicConfig(level=logging.INFO)  # as the CLI does: the peer table is logged at start
port, me = sys.argv[1], int(sys.argv[2])
distributed.maybe_initialize_distributed(
    {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": me}, env={},
    settings={"heartbeat_timeout_s": %d, "collective_timeout_s": 0})
distributed.barrier("both started")
print("ready", flush=True)
if me == 1:
    import time
    time.sleep(600)  # killed by the test
distributed.barrier("process 1 never gets here")  # process 0 waits in a collective for the dead peer
""" % HEARTBEAT_S


def test_a_peer_killed_during_a_collective_is_named_by_host_and_pid_before_jax_aborts(tmp_path):
    """Process 0 waits in a barrier when process 1 is killed. Gloo fails the collective at once without naming
    anyone, the error ends process 0's program, and it waits in JAX's shutdown barrier for the dead peer: there
    the peer watch must still speak (host and pid, exit status 11) before JAX's heartbeat check aborts it with a
    message naming only 'task 1' (which it did while the watch stopped at exit and JAX used the same limit)."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = [tmp_path / f"process-{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", PROGRAM, str(port), str(i)], cwd=REPO, env=env,
                              stdout=logs[i].open("w"), stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all("ready" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)  # process 0 inside the second barrier
        procs[1].kill()
        killed_pid, start = procs[1].pid, time.monotonic()
        code = procs[0].wait(timeout=120)
        stopped_after = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    survivor = logs[0].read_text()
    assert f"process 1 ({socket.gethostname()}, pid {killed_pid}) stopped responding" in survivor, survivor[-3000:]
    assert code == COLLECTIVE_TIMEOUT_STATUS, (code, survivor[-3000:])
    assert "Terminating process because the JAX distributed service" not in survivor, survivor[-3000:]
    assert f"peers: process 0 ({socket.gethostname()}, pid {procs[0].pid}), process 1" in survivor
    assert HEARTBEAT_S / 2 <= stopped_after < 2 * HEARTBEAT_S, stopped_after  # the watch, before JAX's check
