#!/usr/bin/env bash
# GPU fallback for stat-jax: install with jax[cuda12], run on one multi-GPU host (one process drives all its
# GPUs) or on several hosts (one process per host, joined by jax.distributed). See docs/GPU.md for XLA flags.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
usage: launch/gpu.sh COMMAND [options] [-- STAT_JAX_ARGS...]

commands
  install      pip install -e '.[cuda]' + JetStream (--no-deps) into .venv, here or on every --hosts host
  run          run `stat-jax STAT_JAX_ARGS`:
                 no --hosts:          on this host, one process over all its GPUs (or one process of a job
                                      started by SLURM srun / mpirun / by hand with --num-processes ...)
                 --hosts h0,h1,...:   one process per host over ssh; h0 is the coordinator

options
  --hosts H0,H1,...          hosts reachable by passwordless ssh, each with this project at --remote-dir
  --remote-dir DIR           project directory on the hosts (default: this checkout's path)
  --coordinator HOST:PORT    multi-process: process 0's address (default with --hosts: H0:--port)
  --port PORT                coordinator port with --hosts (default: 12321)
  --num-processes N          multi-process by hand: number of processes (sets JAX_PROCESS_COUNT)
  --process-id I             multi-process by hand: this process's index (sets JAX_PROCESS_ID)
  --xla-flags "FLAGS"        appended to XLA_FLAGS (default adds --xla_gpu_enable_latency_hiding_scheduler=true)
  --no-default-xla-flags     do not add the default XLA flags
  --mem-fraction F           XLA_CLIENT_MEM_FRACTION: share of GPU memory JAX preallocates (default 0.75)
  --env KEY=VALUE            extra environment variable (repeatable), e.g. NCCL_DEBUG=INFO
  --python PY                interpreter used to create .venv for install (default: python3)
  --run-id ID                log directory name (default: UTC time)
  --logs-dir DIR             where per-process logs go (default: launch-logs)
  --dry-run                  print every command instead of running it

examples
  launch/gpu.sh install
  launch/gpu.sh run -- sft --config=configs/sft_qwen2_5_3b.py --config.train.batch_size=64
  launch/gpu.sh run --hosts gpu-a,gpu-b -- sft --config=configs/sft_qwen2_5_3b.py
  srun --nodes=2 --ntasks-per-node=1 launch/gpu.sh run -- sft --config=...   # SLURM_* give id and count
EOF
}

COMMAND="${1:-}"
[[ -n "$COMMAND" ]] || { usage; exit 2; }
shift
[[ "$COMMAND" == -h || "$COMMAND" == --help ]] && { usage; exit 0; }

HOSTS=""
REMOTE_DIR="$REPO_ROOT"
COORDINATOR=""
PORT=12321
NUM_PROCESSES=""
PROCESS_ID=""
USER_XLA_FLAGS=""
DEFAULT_XLA_FLAGS=1
MEM_FRACTION=""
PYTHON="python3"
RUN_ID=""
LOGS_DIR="launch-logs"
EXTRA_ENV=()
STAT_JAX_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --coordinator) COORDINATOR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --num-processes) NUM_PROCESSES="$2"; shift 2 ;;
    --process-id) PROCESS_ID="$2"; shift 2 ;;
    --xla-flags) USER_XLA_FLAGS="$2"; shift 2 ;;
    --no-default-xla-flags) DEFAULT_XLA_FLAGS=0; shift ;;
    --mem-fraction) MEM_FRACTION="$2"; shift 2 ;;
    --env) [[ "$2" == *=* ]] || die "--env takes KEY=VALUE, got '$2'"; EXTRA_ENV+=("$2"); shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --run-id) RUN_ID="$2"; shift 2 ;;
    --logs-dir) LOGS_DIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; STAT_JAX_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (stat-jax arguments go after --; see --help)" ;;
  esac
done

[[ -n "$RUN_ID" ]] || RUN_ID="$(new_run_id)"
[[ "$RUN_ID" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-id '$RUN_ID' may only contain letters, digits, '_', '.', '-'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port '$PORT' is not a number"
[[ -z "$MEM_FRACTION" || "$MEM_FRACTION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction '$MEM_FRACTION' must be in (0, 1]"
[[ -z "$MEM_FRACTION" || -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]] || die "--mem-fraction sets \
XLA_CLIENT_MEM_FRACTION, and jax refuses it together with XLA_PYTHON_CLIENT_MEM_FRACTION (set here); unset that"
IFS=',' read -r -a HOST_LIST <<< "$HOSTS"

# The environment every stat-jax process gets (multi-process variables are added per process).
# $1 = local: keep this shell's XLA_FLAGS; remote hosts get only the defaults and --xla-flags.
base_env() {
  local xla=""
  [[ "${1:-}" == local ]] && xla="${XLA_FLAGS:-}"
  # Off by default in jaxlib 0.10.2; overlaps NCCL collectives with compute (docs/GPU.md).
  [[ "$DEFAULT_XLA_FLAGS" == 1 ]] && xla+="${xla:+ }--xla_gpu_enable_latency_hiding_scheduler=true"
  [[ -n "$USER_XLA_FLAGS" ]] && xla+="${xla:+ }$USER_XLA_FLAGS"
  [[ -n "$xla" ]] && printf '%s\n' "XLA_FLAGS=$xla"
  # jaxlib 0.10 reads XLA_CLIENT_MEM_FRACTION; the older XLA_PYTHON_CLIENT_MEM_FRACTION is deprecated.
  [[ -n "$MEM_FRACTION" ]] && printf '%s\n' "XLA_CLIENT_MEM_FRACTION=$MEM_FRACTION"
  [[ ${#EXTRA_ENV[@]} -gt 0 ]] && printf '%s\n' "${EXTRA_ENV[@]}"
  return 0
}

cmd_install() {
  local steps
  steps="cd $(shquote "$REMOTE_DIR") && { [ -x .venv/bin/python ] || $(shquote "$PYTHON") -m venv .venv; } \
&& .venv/bin/python -m pip install -e '.[cuda]' && bash third_party/install_jetstream.sh .venv/bin/python \
&& .venv/bin/python -c 'import jax; print(jax.devices())'"
  if [[ -z "$HOSTS" ]]; then
    run bash -c "$steps"
  else
    local host
    for host in "${HOST_LIST[@]}"; do
      run ssh "$host" "$steps"
    done
  fi
}

run_here() {
  local env_words=()
  mapfile -t env_words < <(base_env local)
  [[ -n "$COORDINATOR" ]] && env_words+=("JAX_COORDINATOR_ADDRESS=$COORDINATOR")
  [[ -n "$NUM_PROCESSES" ]] && env_words+=("JAX_PROCESS_COUNT=$NUM_PROCESSES")
  [[ -n "$PROCESS_ID" ]] && env_words+=("JAX_PROCESS_ID=$PROCESS_ID")
  local stat_jax="$REPO_ROOT/.venv/bin/stat-jax"
  [[ -x "$stat_jax" || "$DRY_RUN" == 1 ]] || stat_jax="stat-jax"
  run mkdir -p "$LOGS_DIR/$RUN_ID"
  local log="$LOGS_DIR/$RUN_ID/process-${PROCESS_ID:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-0}}}.log"
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s 2>&1 | tee %s\n' "$(shjoin env "${env_words[@]}" "$stat_jax" "${STAT_JAX_ARGS[@]}")" \
      "$(shquote "$log")" >&3
    return 0
  fi
  env "${env_words[@]}" "$stat_jax" "${STAT_JAX_ARGS[@]}" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

# One process per host over ssh, all started together; each host's output streams into its own log here.
run_hosts() {
  local n=${#HOST_LIST[@]} i pids=() rc=0 env_words remote
  [[ -n "$COORDINATOR" ]] || COORDINATOR="${HOST_LIST[0]}:$PORT"
  run mkdir -p "$LOGS_DIR/$RUN_ID"
  for (( i = 0; i < n; i++ )); do
    mapfile -t env_words < <(base_env)
    env_words+=("JAX_COORDINATOR_ADDRESS=$COORDINATOR" "JAX_PROCESS_COUNT=$n" "JAX_PROCESS_ID=$i")
    remote="cd $(shquote "$REMOTE_DIR") && $(shjoin env "${env_words[@]}" .venv/bin/stat-jax "${STAT_JAX_ARGS[@]}")"
    if [[ "$DRY_RUN" == 1 ]]; then
      printf '+ %s > %s 2>&1 &\n' "$(shjoin ssh "${HOST_LIST[$i]}" "$remote")" \
        "$(shquote "$LOGS_DIR/$RUN_ID/process-$i.log")" >&3
    else
      note "process $i on ${HOST_LIST[$i]} -> $LOGS_DIR/$RUN_ID/process-$i.log"
      # shellcheck disable=SC2029  # $remote is built and quoted here on purpose
      ssh "${HOST_LIST[$i]}" "$remote" > "$LOGS_DIR/$RUN_ID/process-$i.log" 2>&1 &
      pids+=($!)
    fi
  done
  for (( i = 0; i < ${#pids[@]}; i++ )); do
    wait "${pids[$i]}" || { rc=$?; note "process $i (${HOST_LIST[$i]}) exited with status $rc"; }
  done
  return "$rc"
}

cmd_run() {
  [[ ${#STAT_JAX_ARGS[@]} -gt 0 ]] || die "nothing to run: put the stat-jax command after --, e.g. -- sft --config=..."
  if [[ -n "$HOSTS" ]]; then
    [[ -z "$NUM_PROCESSES$PROCESS_ID" ]] || die "--hosts sets the process count and ids itself"
    refuse_multi_host_serve "${#HOST_LIST[@]}" "${#HOST_LIST[@]} hosts (run it without --hosts, on one host)"
    run_hosts
  else
    if [[ -n "$NUM_PROCESSES" && "$NUM_PROCESSES" != 1 ]]; then
      refuse_multi_host_serve "$NUM_PROCESSES" "$NUM_PROCESSES processes (run one process: drop --num-processes)"
      [[ -n "$PROCESS_ID" && -n "$COORDINATOR" ]] || die "--num-processes needs --process-id and --coordinator"
    fi
    run_here
  fi
}

case "$COMMAND" in
  install) cmd_install ;;
  run) cmd_run ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac
