"""stat_jax.distributed: when a job is multi-process (flags, JAX_*, SLURM, Open MPI, TPU auto-detect), which
rows each process reads, and the CLI's handling of bad multi-process flags."""

import argparse

import jax
import pytest

from stat_jax import cli, distributed, sharding
from stat_jax.distributed import DistributedConfigError, DistributedSpec, resolve_distributed


def _flags(**kw) -> argparse.Namespace:
    base = dict(coordinator_address=None, num_processes=None, process_id=None, distributed=False)
    return argparse.Namespace(**{**base, **kw})


def test_single_process_when_nothing_asks_for_more():
    assert resolve_distributed(_flags(), env={}) is None
    assert resolve_distributed(None, env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert resolve_distributed(_flags(num_processes=1), env={}) is None
    # A shell inside a SLURM allocation that is not an srun task: the user opts out.
    assert resolve_distributed(None, env={"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "STAT_JAX_DISTRIBUTED": "0"}) is None


def test_flags_win_over_env():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.9:1", "JAX_PROCESS_COUNT": "8", "JAX_PROCESS_ID": "7"}
    spec = resolve_distributed(_flags(coordinator_address="h0:1234", num_processes=2, process_id=1), env=env)
    assert spec == DistributedSpec("h0:1234", 2, 1, "flags")
    assert spec.initialize_kwargs() == {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}


def test_jax_env_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.9:5555", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_distributed(None, env=env) == DistributedSpec("10.0.0.9:5555", 4, 3, "env JAX_*")


def test_slurm_and_openmpi_give_count_and_rank_and_let_jax_find_the_coordinator():
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-4]"}
    assert resolve_distributed(None, env=slurm) == DistributedSpec(None, 4, 2, "slurm")
    ompi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "JAX_COORDINATOR_ADDRESS": "h0:9"}
    assert resolve_distributed(None, env=ompi) == DistributedSpec("h0:9", 2, 1, "env JAX_*")


def test_auto_detect_on_tpu_pods_passes_nothing():
    spec = resolve_distributed(None, env={"STAT_JAX_DISTRIBUTED": "1"})
    assert spec is not None and spec.initialize_kwargs() == {}
    assert resolve_distributed(_flags(distributed=True), env={}).initialize_kwargs() == {}


def test_config_section_is_read_too():
    from ml_collections import ConfigDict

    config = ConfigDict({"distributed": {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}})
    assert resolve_distributed(config, env={}) == DistributedSpec("h:1", 2, 0, "flags")
    assert resolve_distributed(ConfigDict({"seed": 0}), env={}) is None


@pytest.mark.parametrize("flags, env, message", [
    (_flags(num_processes=2, process_id=0), {}, "no coordinator"),
    (_flags(num_processes=2, coordinator_address="h:1"), {}, "no process id"),
    (_flags(num_processes=2, process_id=2, coordinator_address="h:1"), {}, "outside 0..1"),
    (_flags(coordinator_address="h:1", process_id=0), {}, "no process count"),
    (None, {"JAX_PROCESS_COUNT": "two"}, "not an integer"),
    (_flags(num_processes=0), {}, "must be >= 1"),
])
def test_inconsistent_settings_are_clear_errors(flags, env, message):
    with pytest.raises(DistributedConfigError, match=message):
        resolve_distributed(flags, env=env)


def test_cli_reports_a_bad_multi_process_setup_before_running(capsys):
    code = cli.main(["smoke", "--num-processes=2", "--process-id=0"])
    assert code == 2
    assert "distributed setup error" in capsys.readouterr().err


def test_single_process_helpers_are_no_ops():
    assert distributed.maybe_initialize_distributed(_flags(), env={}) is None
    assert distributed.is_coordinator()
    distributed.barrier("nothing-to-wait-for")
    assert distributed.broadcast_from_coordinator({"seed": 3}) == {"seed": 3}


def test_a_process_share_must_be_the_rows_its_devices_hold_on_a_fake_two_process_layout():
    """With devices 0-3 on 'process 0' and 4-7 on 'process 1', each process feeds half of the batch's rows."""
    from stat_jax.train import loop

    class HalfOfTheDevices:  # the addressable view of a sharding, as process 1 would see it
        def __init__(self, named, lo, hi):
            self.named, self.devices = named, set(jax.devices()[lo:hi])

        def addressable_devices_indices_map(self, shape):
            return {d: i for d, i in self.named.devices_indices_map(shape).items() if d in self.devices}

    named = sharding.batch_sharding(sharding.make_mesh(fsdp=8), ndim=2, shape=(16, 3))
    micro = jax.sharding.NamedSharding(named.mesh, jax.sharding.PartitionSpec(None, *named.spec))
    loop._check_process_share(HalfOfTheDevices(micro, 0, 4), (1, 16, 3), 8, "tokens")
    loop._check_process_share(HalfOfTheDevices(micro, 4, 8), (1, 16, 3), 8, "tokens")
    with pytest.raises(ValueError, match="batch axis is not split over the processes"):
        loop._check_process_share(HalfOfTheDevices(micro, 0, 8), (1, 16, 3), 8, "tokens")
