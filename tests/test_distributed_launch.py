"""launch/tpu.sh run and launch/gpu.sh on several hosts: every generating command (eval, grpo, run) gets the
multi-process settings on every host, and `serve`, a single-host server, is refused before any host is touched."""

import shlex

import pytest

from tests.launch.test_launch_scripts import GPU, TPU, _commands, _gcloud, _launch, _remote_command, _tpu

GENERATING = [
    ["eval", "--config=configs/eval_tiny.py", "--config.model.path=gcs/student", "--resume"],
    ["grpo", "--config=configs/grpo_tiny.py", "--config.distributed.collective_timeout_s=300"],
    ["run", "--config=configs/stat_sel_llama3_2_1b.py", "--config.workdir=gcs/runs/stat", "--resume"],
]


@pytest.mark.parametrize("args", GENERATING, ids=lambda a: a[0])
def test_tpu_pod_runs_every_generating_command_as_one_job_on_all_workers(args):
    (ssh,) = _gcloud(_tpu("run", "stat-v5p", "v5p-32", "--", *args), "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh  # the same program on the 4 workers at once
    remote = shlex.split(_remote_command(ssh))
    assert "STAT_JAX_DISTRIBUTED=1" in remote  # each worker joins jax.distributed (slice layout from metadata)
    assert remote[remote.index(".venv/bin/stat-jax") + 1: remote.index("2>&1")] == args


@pytest.mark.parametrize("args", GENERATING, ids=lambda a: a[0])
def test_gpu_hosts_run_every_generating_command_with_one_coordinator(args):
    out = _launch(GPU, "run", "--dry-run", "--run-id", "g1", "--hosts", "gpu-a,gpu-b,gpu-c", "--", *args).stdout
    ssh = [argv for argv in _commands(out) if argv[0] == "ssh"]
    assert [argv[1] for argv in ssh] == ["gpu-a", "gpu-b", "gpu-c"]
    for i, argv in enumerate(ssh):
        remote = shlex.split(argv[2])
        assert {"JAX_COORDINATOR_ADDRESS=gpu-a:12321", "JAX_PROCESS_COUNT=3", f"JAX_PROCESS_ID={i}"} <= set(remote)
        assert remote[remote.index(".venv/bin/stat-jax") + 1:] == args


def test_serve_is_refused_on_several_hosts_and_allowed_on_one():
    serve = ["serve", "--config=configs/serve_tiny.py"]
    for script, where in ((TPU, ["--name", "n", "--zone", "z", "--type", "v5p-32"]), (GPU, ["--hosts", "a,b"]),
                          (GPU, ["--num-processes", "2", "--process-id", "0", "--coordinator", "a:1"])):
        proc = _launch(script, "run", "--dry-run", *where, "--", *serve, check=False)
        assert proc.returncode == 2 and "stat-jax serve is a single-host server" in proc.stderr, proc.stderr
        assert not [line for line in proc.stdout.splitlines() if line.startswith("+ ")]  # nothing was run
    (ssh,) = _gcloud(_tpu("run", "stat-v5e", "v5e-8", "--", *serve), "tpus", "tpu-vm", "ssh")
    assert "STAT_JAX_DISTRIBUTED" not in _remote_command(ssh)
    out = _launch(GPU, "run", "--dry-run", "--run-id", "g1", "--", *serve).stdout
    (line,) = [line for line in out.splitlines() if "stat-jax serve" in line]
    assert "JAX_PROCESS_COUNT" not in line and shlex.join(serve) in line
