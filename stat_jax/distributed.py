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
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

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


def maybe_initialize_distributed(flags: Any = None, env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """Calls `jax.distributed.initialize` when flags/env describe a multi-process job; a no-op otherwise.

    Must run before anything asks JAX for its devices. Safe to call twice (the second call does nothing).
    """
    spec = resolve_distributed(flags, env)
    if spec is None or is_initialized():
        return spec
    import jax

    log.info("jax.distributed.initialize(%s) [from %s]", spec.initialize_kwargs() or "auto-detect", spec.source)
    try:
        jax.distributed.initialize(**spec.initialize_kwargs())
    except Exception as e:  # noqa: BLE001 -- re-raised with the settings that were used
        raise RuntimeError(f"jax.distributed.initialize({spec.initialize_kwargs()}) from {spec.source} failed: {e}. "
                           "Check that every process uses the same coordinator address and process count, "
                           "that process 0 is running, and that its port is reachable.") from e
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return spec


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

    multihost_utils.sync_global_devices(name)


def broadcast_from_coordinator(value: Any) -> Any:
    """Process 0's value of a pytree of numbers/arrays, on every process (e.g. a seed or a step count)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """Rows each process reads per step; the global batch must split evenly over processes."""
    import jax

    n = jax.process_count() if process_count is None else process_count
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} must be a multiple of the {n} processes "
                         f"(train.batch_size); use {(global_batch_size // n + 1) * n}")
    return global_batch_size // n


def process_row_range(batch_sharding: Any, global_shape: tuple[int, ...], axis: int = 0) -> range:
    """The rows (along `axis`) of a global batch that this process's devices hold under `batch_sharding`.

    Each process should read exactly these rows from the data: `global_batch[rows]` for this process is what
    `jax.make_array_from_process_local_data` expects. The range follows the mesh's device order, which on TPU
    pods need not be process order.
    """
    rows: set[int] = set()
    for index in batch_sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        s = index[axis] if index and len(index) > axis else slice(None)
        rows.update(range(*s.indices(global_shape[axis])))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(f"process rows {sorted(rows)} of a batch of {global_shape[axis]} are not contiguous under "
                         f"{batch_sharding}; build the mesh so each process's devices are adjacent on the batch axes")
    return range(lo, hi)


def global_batch_from_local(local_batch: Any, batch_sharding: Any, global_batch_size: int, axis: int = 0) -> Any:
    """This process's rows (numpy pytree) -> global jax.Arrays sharded by `batch_sharding` across all processes."""
    import jax
    import numpy as np

    def one(x):
        x = np.asarray(x)
        shape = x.shape[:axis] + (global_batch_size,) + x.shape[axis + 1:]
        rows = process_row_range(batch_sharding, shape, axis)
        if x.shape[axis] != len(rows):
            raise ValueError(f"process {jax.process_index()} holds rows {rows.start}..{rows.stop - 1} of the global "
                             f"batch ({len(rows)} rows) but was given {x.shape[axis]} rows (shape {x.shape})")
        if jax.process_count() == 1:
            return jax.device_put(x, batch_sharding)
        return jax.make_array_from_process_local_data(batch_sharding, x, shape)

    return jax.tree.map(one, local_batch)
