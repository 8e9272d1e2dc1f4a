"""Multi-process JAX: when to call `jax.distributed.initialize()`, who is the coordinator, and which rows
of the global batch each process reads.

A job is multi-process when any of these says so (first match wins):
  1. flags `--coordinator-address HOST:PORT --num-processes N --process-id I` (or a Mapping / argparse
     Namespace / ConfigDict with those fields, underscores),
  2. env `JAX_COORDINATOR_ADDRESS`, `JAX_PROCESS_COUNT` (or `JAX_NUM_PROCESSES`), `JAX_PROCESS_ID`,
  3. SLURM (`SLURM_NTASKS` > 1, `SLURM_PROCID`) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1,
     `OMPI_COMM_WORLD_RANK`); the coordinator address comes from 1/2 or JAX's own SLURM/Open MPI detection,
  4. flag `--distributed` or env `STAT_JAX_DISTRIBUTED=1`: JAX detects everything itself (Cloud TPU pods,
     where the TPU VM metadata names the workers; `launch/tpu.sh` sets it on multi-host slices).
Otherwise the job is one process and nothing is initialized; `STAT_JAX_DISTRIBUTED=0` forces that.

Every process runs the same program on its own devices; `jax.devices()` then lists all processes' devices,
so a mesh built from it spans every host. Host-side side effects (teacher calls, run manifests, exports)
belong to the coordinator: guard them with `is_coordinator()` and line the processes up with `barrier(name)`.

A process that dies or stalls leaves the others blocked inside a collective, which nothing can interrupt. Two
limits end such a job instead of letting it hang, each with an error naming the process that stopped responding
and its host and pid: stat-jax's peer watch ends every other process when a peer's heartbeat stops for half of
`distributed.heartbeat_timeout_s` (also while they exit), and `collective_deadline` (rollout steps, broadcasts,
barriers) ends this process after `distributed.collective_timeout_s`. JAX's coordination service keeps its own
check, at twice `heartbeat_timeout_s`, only as a backstop: it aborts the survivors from C++ with a message that
names a task number, and nothing in Python can add the host to that. When process 0 (the coordinator) dies,
jaxlib aborts the others the moment its socket closes, with a message about "the leader task" that names no
host; the thin parent each multi-process command runs under (`stat_jax.supervisor`) then prints the error
naming process 0's host and pid, from the peer table its child wrote ("peers: process 0 (HOST, pid P), ...").
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from stat_jax import supervisor
from stat_jax.errors import ConfigError

log = logging.getLogger(__name__)

TRUE_VALUES = ("1", "true", "yes", "auto", "on")
FALSE_VALUES = ("0", "false", "no", "off")


class DistributedConfigError(ConfigError):
    """The flags/environment describe an inconsistent multi-process job."""

    hint = "check --coordinator-address/--num-processes/--process-id and the JAX_*/SLURM_*/OMPI_* environment"


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """What to pass to `jax.distributed.initialize` (None = let JAX detect it) and where it came from."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str

    def initialize_kwargs(self) -> dict[str, Any]:
        names = ("coordinator_address", "num_processes", "process_id")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def _field(obj: Any, name: str) -> Any:
    """Reads `name` (or its dashed spelling) from a Mapping, argparse Namespace or ConfigDict; None if absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name, obj.get(name.replace("_", "-")))
    try:
        return getattr(obj, name, None)
    except (AttributeError, KeyError):
        return None


def _as_int(value: Any, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{what}={value!r} is not an integer") from None


def _from_flags(flags: Any) -> tuple[str | None, int | None, int | None, bool]:
    section = _field(flags, "distributed")
    if section is not None and not isinstance(section, (bool, str, int)):
        flags = section  # a config section `distributed` with the same fields
        section = _field(flags, "enabled")
    return (
        _field(flags, "coordinator_address") or None,
        _as_int(_field(flags, "num_processes"), "--num-processes"),
        _as_int(_field(flags, "process_id"), "--process-id"),
        section is not None and section is not False and str(section).lower() in TRUE_VALUES,
    )


def _from_cluster_env(env: Mapping[str, str]) -> tuple[int | None, int | None, str | None]:
    """(process count, process id, scheduler) from SLURM or Open MPI variables, when they describe > 1 task."""
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return _as_int(env["SLURM_NTASKS"], "SLURM_NTASKS"), _as_int(env["SLURM_PROCID"], "SLURM_PROCID"), "slurm"
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        return (_as_int(env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE"),
                _as_int(env["OMPI_COMM_WORLD_RANK"], "OMPI_COMM_WORLD_RANK"), "ompi")
    return None, None, None


def resolve_distributed(flags: Any = None, env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """The multi-process job described by flags and environment, or None for a single-process job."""
    env = os.environ if env is None else env
    if env.get("STAT_JAX_DISTRIBUTED", "").lower() in FALSE_VALUES:  # e.g. a shell inside `salloc -n 4`
        return None
    address, count, pid, auto = _from_flags(flags)
    source = "flags" if (address or count is not None or pid is not None) else None
    if address is None and env.get("JAX_COORDINATOR_ADDRESS"):
        address, source = env["JAX_COORDINATOR_ADDRESS"], source or "env JAX_*"
    if count is None:
        raw = env.get("JAX_PROCESS_COUNT") or env.get("JAX_NUM_PROCESSES")
        count = _as_int(raw, "JAX_PROCESS_COUNT")
        source = source or ("env JAX_*" if count is not None else None)
    if pid is None and env.get("JAX_PROCESS_ID"):
        pid, source = _as_int(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID"), source or "env JAX_*"
    cluster_count, cluster_pid, scheduler = _from_cluster_env(env)
    if count is None and cluster_count is not None:
        count, source = cluster_count, source or scheduler
    if pid is None and cluster_pid is not None:
        pid = cluster_pid
    auto = auto or env.get("STAT_JAX_DISTRIBUTED", "").lower() in TRUE_VALUES

    if count is not None and count < 1:
        raise DistributedConfigError(f"process count must be >= 1, got {count} (from {source})")
    if count == 1 and not auto:
        return None
    if count is None and not auto:
        if address is not None or pid is not None:
            raise DistributedConfigError(
                f"coordinator address {address!r} / process id {pid!r} given ({source}) but no process count: "
                "pass --num-processes N or set JAX_PROCESS_COUNT")
        return None
    if count is not None and pid is not None and not 0 <= pid < count:
        raise DistributedConfigError(f"process id {pid} is outside 0..{count - 1} ({source})")
    if count is not None and count > 1 and not auto:
        if pid is None:
            raise DistributedConfigError(f"{count} processes but no process id: pass --process-id I or set "
                                         "JAX_PROCESS_ID (or run under SLURM / mpirun)")
        if address is None and scheduler is None:
            raise DistributedConfigError(f"{count} processes but no coordinator: pass --coordinator-address "
                                         "HOST:PORT (process 0's address) or set JAX_COORDINATOR_ADDRESS")
    return DistributedSpec(address, count, pid, source or "auto-detect (--distributed / STAT_JAX_DISTRIBUTED)")


def is_initialized() -> bool:
    import jax

    return bool(jax.distributed.is_initialized())


def maybe_initialize_distributed(flags: Any = None, env: Mapping[str, str] | None = None,
                                 settings: Any = None) -> DistributedSpec | None:
    """Calls `jax.distributed.initialize` when flags/env describe a multi-process job; a no-op otherwise.

    `settings`: the config's `distributed` section (heartbeat_timeout_s, collective_timeout_s), or None for
    the defaults. Must run before anything asks JAX for its devices. Safe to call twice (the second call does
    nothing).
    """
    spec = resolve_distributed(flags, env)
    global _heartbeat_timeout_s, _watch_stale_s
    heartbeat = max(int(_setting(settings, "heartbeat_timeout_s", DEFAULT_HEARTBEAT_TIMEOUT_S)), 1)
    _heartbeat_timeout_s = heartbeat
    set_collective_timeout(_setting(settings, "collective_timeout_s", DEFAULT_COLLECTIVE_TIMEOUT_S))
    if spec is None or is_initialized():
        return spec
    import jax

    log.info("jax.distributed.initialize(%s) [from %s]", spec.initialize_kwargs() or "auto-detect", spec.source)
    try:
        with _coordination_service_heartbeat_limit(SERVICE_HEARTBEAT_FACTOR * heartbeat):
            jax.distributed.initialize(**spec.initialize_kwargs(), heartbeat_timeout_seconds=heartbeat)
    except Exception as e:  # noqa: BLE001 -- re-raised with the settings that were used
        raise RuntimeError(f"jax.distributed.initialize({spec.initialize_kwargs()}) from {spec.source} failed: {e}. "
                           "Check that every process uses the same coordinator address and process count, "
                           "that process 0 is running, and that its port is reachable.") from e
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    global _coordinator_address
    from jax._src import distributed as jax_distributed  # the address JAX resolved (auto-detect included)

    _coordinator_address = spec.coordinator_address or getattr(jax_distributed.global_state,
                                                                "coordinator_address", None)
    _register_host()
    watch = _PeerWatch(heartbeat / 2)
    _watch_stale_s = watch.stale_s
    watch.start()
    return spec


# ----- failures on other hosts ---------------------------------------------------------------------------------

DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's own default
# The coordination service's check on process 0 that a task still heartbeats, as a multiple of heartbeat_timeout_s.
# JAX gives it the clients' limit, and a client heartbeats every half of that, so the service declares a killed
# process dead 0.5 to 1 limit after it died: as early as the peer watch (half a limit), which lost that race on
# loaded machines and left the survivors with JAX's abort naming only "task 1". At twice the limit the watch,
# which names the host and pid, speaks 1.5 limits earlier.
SERVICE_HEARTBEAT_FACTOR = 2
DEFAULT_COLLECTIVE_TIMEOUT_S = 900.0
COLLECTIVE_TIMEOUT_STATUS = 11  # exit status of a process ended by `collective_deadline`
_HOST_KEY = "stat_jax/host/"
_BEAT_KEY = "stat_jax/beat/"
_EXITED_KEY = "stat_jax/exited/"
_collective_timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S
_heartbeat_timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S
_watch_stale_s: float | None = None  # the running peer watch's limit; None before initialize
_peers: dict[int, str] = {}  # process index -> "HOST, pid P", read once so errors need not ask the coordinator
_coordinator_address: str | None = None


def _setting(section: Any, name: str, default: float) -> float:
    value = _field(section, name)
    return default if value is None else float(value)


def set_collective_timeout(seconds: float) -> None:
    """The default limit of `collective_deadline` (distributed.collective_timeout_s); 0 disables it."""
    global _collective_timeout_s
    if seconds < 0:
        raise DistributedConfigError(f"distributed.collective_timeout_s={seconds} must be >= 0 (0 = no limit)")
    _collective_timeout_s = float(seconds)


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


@contextlib.contextmanager
def _coordination_service_heartbeat_limit(seconds: int):
    """Within the block, JAX's coordination service (started by `jax.distributed.initialize` on process 0) gets
    its own heartbeat limit of `seconds`; the clients keep the one passed to `initialize`.

    `initialize` has no argument for this, so the jaxlib factory it calls is wrapped for the call only. A jaxlib
    whose factory takes no `heartbeat_timeout` keeps JAX's behaviour (the watch may then lose the race above).
    """
    from jax._src.lib import _jax

    make_service = _jax.get_distributed_runtime_service
    if "heartbeat_timeout" not in (make_service.__doc__ or ""):
        log.warning("this jaxlib's get_distributed_runtime_service takes no heartbeat_timeout: a dead peer may be "
                    "reported by JAX's task number instead of its host")
        yield
        return

    def make_with_limit(*args, **kwargs):
        kwargs["heartbeat_timeout"] = int(seconds)
        return make_service(*args, **kwargs)

    _jax.get_distributed_runtime_service = make_with_limit
    try:
        yield
    finally:
        _jax.get_distributed_runtime_service = make_service


def _register_host() -> None:
    """Publishes this process's host and pid, so another process's error can say where a dead peer ran."""
    import jax

    me = f"{socket.gethostname()}, pid {supervisor.command_pid()}"
    _peers[jax.process_index()] = me
    _client().key_value_set(f"{_HOST_KEY}{jax.process_index()}", me)


def _read_peer_table(client, count: int) -> None:
    """Copies the hosts the processes published into `_peers`; logs the table once every process is in it."""
    if len(_peers) == count:
        return
    for key, value in client.key_value_dir_get(_HOST_KEY):
        _peers[int(key.rsplit("/", 1)[-1])] = value
    if len(_peers) == count:
        log.info("peers: %s", ", ".join(describe_process(i) for i in range(count)))
        import jax

        supervisor.write_peer_table(jax.process_index(), _peers, _coordinator_address)


def describe_process(index: int) -> str:
    """'process I (HOST, pid P)' from what it published at start; 'process I' when that cannot be read."""
    if index not in _peers:
        with contextlib.suppress(Exception):  # the coordinator itself may be gone
            value = _client().key_value_try_get(f"{_HOST_KEY}{index}")
            if value:
                _peers[index] = value
    return f"process {index} ({_peers[index]})" if index in _peers else f"process {index}"


def unresponsive_processes(wait_s: float = 10.0) -> list[int] | None:
    """The processes JAX's coordination service no longer counts as live; None when it cannot say in `wait_s`
    (the coordinator, process 0, is gone or unreachable)."""
    import jax

    everyone = list(range(jax.process_count()))
    answer: list[list[int]] = []

    def ask():
        with contextlib.suppress(Exception):
            answer.append(sorted(set(everyone) - set(_client().get_live_nodes(everyone))))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(wait_s)
    return answer[0] if answer else None


def collective_timeout_message(what: str, seconds: float) -> str:
    """The error a process prints when `what` (a step every process must take part in) did not complete."""
    import jax

    me = describe_process(jax.process_index())
    gone = unresponsive_processes()
    if gone is None:
        who = "the coordinator (process 0) does not answer either: it or its host is likely down"
    elif gone:
        who = "not responding: " + ", ".join(describe_process(i) for i in gone)
    else:
        who = "every process still sends heartbeats, so one is stuck or much slower (see the other hosts' logs)"
    return (f"{me}: {what} did not complete within {seconds:.0f} s (distributed.collective_timeout_s) on a "
            f"{jax.process_count()}-process job; {who}. This process stops rather than wait forever; fix or "
            f"restart the failed host and rerun the same command on every host with --resume")


def _fail(message: str) -> None:
    """Ends this process at once: a collective that lost its peer cannot be unwound from Python."""
    log.error(message)
    print(f"stat-jax: error: {message}", file=sys.stderr, flush=True)
    os._exit(COLLECTIVE_TIMEOUT_STATUS)


class _PeerWatch(threading.Thread):
    """Every second, bumps this process's beat in JAX's key-value store and reads the others'. A peer whose beat
    stops for `stale_s` without it having exited cleanly ends this process with an error naming the peer and
    its host. `stale_s` is half of distributed.heartbeat_timeout_s; JAX's own check, which names a task number
    only, comes at SERVICE_HEARTBEAT_FACTOR limits.

    It keeps watching while this process leaves the job: an error that ends one process (a collective that
    failed when its peer died) leaves it waiting in JAX's shutdown barrier for that peer, and there JAX's check
    would otherwise be the one to end it."""

    def __init__(self, stale_s: float):
        super().__init__(name="stat-jax-peer-watch", daemon=True)
        # At least 10 s: a loaded host may not run this thread for a few seconds, and a false alarm kills a job.
        self.stale_s = max(float(stale_s), 10.0)
        # Registered after `import jax`, so it runs before JAX's own exit handler (atexit runs the last first).
        atexit.register(self._leave_job)
        self._exiting = False
        self._stopped = False

    def _leave_job(self) -> None:
        """At exit: says this process exited cleanly, waits in JAX's shutdown barrier for the others while this
        thread still watches them, then stops the thread. JAX's exit handler would reach that barrier too, but
        with the thread still calling into JAX while the interpreter finalizes, which aborts the process."""
        import jax

        self._exiting = True
        with contextlib.suppress(Exception):
            _client().key_value_set(f"{_EXITED_KEY}{jax.process_index()}", "1", allow_overwrite=True)
        try:
            jax.distributed.shutdown()
        finally:
            self._stopped = True
            self.join(timeout=10.0)

    def run(self) -> None:
        import jax

        # Asked once: after JAX's exit handler clears the backends, asking JAX again would start a new one.
        me, count, client = jax.process_index(), jax.process_count(), _client()
        seen = {i: (None, time.monotonic()) for i in range(count) if i != me}
        unreachable_since = None
        while not self._stopped:
            try:
                client.key_value_increment(f"{_BEAT_KEY}{me}", 1)
                beats = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(_BEAT_KEY)}
                exited = {k.rsplit("/", 1)[-1] for k, _ in client.key_value_dir_get(_EXITED_KEY)}
                _read_peer_table(client, count)
                unreachable_since = None
            except Exception as e:  # noqa: BLE001 -- the coordinator's store is gone or unreachable
                if self._exiting:
                    return  # the coordinator finished and took its store with it, or this process left the job
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > self.stale_s:
                    _fail(f"{describe_process(me)}: the coordinator, {describe_process(0)}, has not answered for "
                          f"{self.stale_s:.0f} s ({e}); it or its host is down. Every process of the job stops; "
                          f"rerun the same command on every host with --resume")
                time.sleep(1.0)
                continue
            now = time.monotonic()
            for i, (beat, since) in seen.items():
                if beats.get(str(i)) != beat:
                    seen[i] = (beats.get(str(i)), now)
                elif str(i) not in exited and now - since > self.stale_s:
                    _fail(f"{describe_process(me)}: {describe_process(i)} stopped responding (no heartbeat for "
                          f"{self.stale_s:.0f} s, half of distributed.heartbeat_timeout_s): it or its host is "
                          f"down. Every process of the job stops; restart that host and rerun the same command on "
                          f"every host with --resume")
            time.sleep(1.0)


def peer_failure_note(error: BaseException) -> str:
    """After a device program failed in a multi-process job: which process raised it and which peers stopped
    responding ('' in a single-process job, or for an error that no collective raised).

    A collective whose peer died fails at once on some transports (gloo on CPU: 'connection reset by peer')
    without saying which process it was; the peer watch notices the death after its limit and ends this process
    naming the peer, so this waits that long (plus a margin) before it blames this process.
    """
    import jax

    if jax.process_count() == 1 or type(error).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return ""
    deadline = time.monotonic() + (_watch_stale_s or _heartbeat_timeout_s) + 5
    gone = unresponsive_processes()
    while gone == [] and time.monotonic() < deadline:
        time.sleep(1.0)
        gone = unresponsive_processes()
    me = describe_process(jax.process_index())
    if gone is None:
        return f" on {me}; the coordinator (process 0) does not answer: it or its host is likely down"
    if gone:
        return f" on {me}; not responding: {', '.join(describe_process(i) for i in gone)}"
    return f" on {me}; every process still sends heartbeats, so the failure is this process's own"


class _Watchdog(threading.Thread):
    """One daemon thread that ends the process when an armed deadline passes (a blocked collective cannot be
    interrupted from Python, so exiting is the only way out)."""

    def __init__(self):
        super().__init__(name="stat-jax-collective-watchdog", daemon=True)
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, str, float]] = {}  # token -> (deadline, what, seconds)
        self._tokens = 0

    def arm(self, what: str, seconds: float) -> int:
        with self._cond:
            self._tokens += 1
            self._armed[self._tokens] = (time.monotonic() + seconds, what, seconds)
            self._cond.notify()
            return self._tokens

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._armed:
                    self._cond.wait()
                deadline, what, seconds = min(self._armed.values())
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(min(left, 1.0))
                    continue
            _fail(collective_timeout_message(what, seconds))


_watchdog: _Watchdog | None = None
_watchdog_lock = threading.Lock()


@contextlib.contextmanager
def collective_deadline(what: str, seconds: float | None = None):
    """Ends this process with `collective_timeout_message` if the block takes longer than `seconds`
    (default: distributed.collective_timeout_s); a no-op in a single-process job or with a limit of 0.

    Wrap what every process must complete together: a rollout step, a broadcast, a barrier.
    """
    import jax

    seconds = _collective_timeout_s if seconds is None else seconds
    if jax.process_count() == 1 or not seconds:
        yield
        return
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
            _watchdog.start()
    token = _watchdog.arm(what, seconds)
    try:
        yield
    finally:
        _watchdog.disarm(token)


def is_coordinator() -> bool:
    """True on process 0: the one that talks to the teacher, writes manifests and exports."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (names must match across processes)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    with collective_deadline(f"barrier {name!r}"):
        multihost_utils.sync_global_devices(name)


def broadcast_from_coordinator(value: Any) -> Any:
    """Process 0's value of a pytree of numbers/arrays, on every process (e.g. a seed or a step count)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    with collective_deadline("a broadcast from process 0"):
        return multihost_utils.broadcast_one_to_all(value)
