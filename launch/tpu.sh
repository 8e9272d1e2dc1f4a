#!/usr/bin/env bash
# Cloud TPU VMs (single host or pod slice) for stat-jax: create, set up, run on every worker, collect logs,
# delete; and a spot loop that re-creates a preempted slice and resumes from the last checkpoint.
# Run `launch/tpu.sh --help`; every command accepts --dry-run (print the gcloud commands, run nothing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND --name NAME --zone ZONE [options] [-- STAT_JAX_ARGS...]

commands
  create       create the TPU VM (--queued: through a queued resource, waits until ACTIVE)
  setup        copy (or --repo: clone) the project to every worker, install it with jax[tpu] + JetStream
  run          run `stat-jax STAT_JAX_ARGS` on all workers at once; logs go to ~/stat-jax/logs/RUN_ID on each
               worker and are then collected into LOGS_DIR/RUN_ID/worker-N/
  logs         collect the logs of --run-id from every worker
  stop|start   stop / start a single-host TPU VM (pod slices cannot be stopped, only deleted)
  delete       delete the TPU VM (or the queued resource and its VM)
  spot         the preemptible workflow: (re)create a spot queued resource, set it up, run with --resume,
               and repeat after each preemption until the command succeeds (needs --mount-bucket)
  describe     print the TPU VM's state and worker count

options
  --name NAME            TPU VM name (also the queued resource's node id)        [env TPU_NAME]
  --zone ZONE            e.g. us-east5-a                                         [env TPU_ZONE]
  --project PROJECT      gcloud project (default: gcloud's configured project)   [env TPU_PROJECT]
  --type TYPE            accelerator type: v5e-8 (= v5litepod-8), v5p-32, v6e-8, v4-8, ...
  --version VERSION      TPU software version (default chosen from --type)
  --queued               create through `gcloud compute tpus queued-resources` (default for `spot`)
  --spot                 spot (preemptible) capacity
  --workers N            number of worker VMs (default: from --type; checked against gcloud when not --dry-run)
  --repo URL [--ref REF] setup: git clone URL on every worker instead of copying this checkout
  --remote-dir DIR       project directory on the workers, relative to $HOME (default: stat-jax)
  --python VERSION       Python for the workers' venv, fetched by uv when missing (default: 3.11)
  --mount-bucket BUCKET  setup: mount gs://BUCKET at ~/REMOTE_DIR/gcs on every worker (gcsfuse); put
                         --config.workdir under gcs/ so checkpoints are shared by all workers and survive
                         preemption
  --env KEY=VALUE        run: extra environment variable on the workers (repeatable), e.g. LIBTPU_INIT_ARGS=...
  --run-id ID            run/logs: log directory name (default: UTC time)
  --logs-dir DIR         where logs are collected locally (default: launch-logs)
  --max-attempts N       spot: give up after N runs (default: 20)
  --poll-seconds S       seconds between queued-resource state checks (default: 30)
  --keep                 spot: keep the slice after success (default: delete it)
  --dry-run              print every command instead of running it

examples
  launch/tpu.sh create --name stat-v5e --zone us-west4-a --type v5e-8
  launch/tpu.sh setup  --name stat-v5e --zone us-west4-a --type v5e-8
  launch/tpu.sh run    --name stat-v5e --zone us-west4-a --type v5e-8 -- sft --config=configs/sft_qwen2_5_3b.py \
      --config.train.learning_rate=1e-5
  launch/tpu.sh spot   --name stat-v5p --zone us-east5-a --type v5p-32 --mount-bucket my-bucket -- \
      run --config=configs/stat_qwen2_5_3b.py --config.workdir=gcs/runs/stat
EOF
}

# ----- options ----------------------------------------------------------------------------------------------
COMMAND="${1:-}"
[[ -n "$COMMAND" ]] || { usage; exit 2; }
shift
[[ "$COMMAND" == -h || "$COMMAND" == --help ]] && { usage; exit 0; }

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
TYPE=""
VERSION=""
QUEUED=0
SPOT=0
WORKERS=""
REPO_URL=""
REF=""
REMOTE_DIR="stat-jax"
PYTHON_VERSION="3.11"
BUCKET=""
RUN_ID=""
LOGS_DIR="launch-logs"
MAX_ATTEMPTS=20
POLL_SECONDS=30
KEEP=0
EXTRA_ENV=()
STAT_JAX_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --repo) REPO_URL="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --python) PYTHON_VERSION="$2"; shift 2 ;;
    --mount-bucket) BUCKET="${2#gs://}"; shift 2 ;;
    --env) [[ "$2" == *=* ]] || die "--env takes KEY=VALUE, got '$2'"; EXTRA_ENV+=("$2"); shift 2 ;;
    --run-id) RUN_ID="$2"; shift 2 ;;
    --logs-dir) LOGS_DIR="$2"; shift 2 ;;
    --max-attempts) MAX_ATTEMPTS="$2"; shift 2 ;;
    --poll-seconds) POLL_SECONDS="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; STAT_JAX_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (stat-jax arguments go after --; see --help)" ;;
  esac
done

require_value --name "$NAME"
require_value --zone "$ZONE"
require_tool gcloud "install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir '$REMOTE_DIR' must be a plain relative path"
[[ -z "$BUCKET" || "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "--mount-bucket '$BUCKET' is not a bucket name"
[[ -n "$RUN_ID" ]] || RUN_ID="$(new_run_id)"
[[ "$RUN_ID" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-id '$RUN_ID' may only contain letters, digits, '_', '.', '-'"
QR_NAME="${NAME}-qr"

GLOBAL_FLAGS=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && GLOBAL_FLAGS+=("--project=$PROJECT")

# ----- accelerator types ------------------------------------------------------------------------------------
# gcloud's name for a type: v5e is `v5litepod-N` in the TPU API.
gcloud_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# Default TPU software version per generation (Cloud TPU "TPU software versions" page).
default_version() {
  case "$1" in
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default --version for accelerator type '$1'; pass --version" ;;
  esac
}

# Worker VMs in a slice. v2-v5p name TensorCores (8 per host VM: v5p-32 = 16 chips on 4 VMs);
# v5e/v6e name chips (up to 8 on one host; multi-host slices have 4 chips per VM).
workers_for_type() {
  local type="$1" n="${1##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$type'; pass --workers"
  case "$type" in
    v2-*|v3-*|v4-*|v5p-*) echo $(( n <= 8 ? 1 : n / 8 )) ;;
    v5litepod-*|v6e-*) echo $(( n <= 8 ? 1 : n / 4 )) ;;
    *) die "unknown accelerator type '$type'; pass --workers" ;;
  esac
}

if [[ -n "$TYPE" ]]; then
  TYPE="$(gcloud_type "$TYPE")"
  [[ -n "$VERSION" ]] || VERSION="$(default_version "$TYPE")"
  [[ -n "$WORKERS" ]] || WORKERS="$(workers_for_type "$TYPE")"
fi

# The slice's real worker count from gcloud (its network endpoints), unless --workers/--type set it for a dry run.
worker_count() {
  if [[ "$DRY_RUN" == 1 || -z "$WORKERS" ]]; then
    if [[ -z "$WORKERS" ]]; then
      [[ "$DRY_RUN" == 1 ]] && die "--dry-run needs --type or --workers to know the number of workers"
      WORKERS="$(gcloud compute tpus tpu-vm describe "$NAME" "${GLOBAL_FLAGS[@]}" \
        --format='value(networkEndpoints.len())')"
    fi
  else
    local actual
    actual="$(gcloud compute tpus tpu-vm describe "$NAME" "${GLOBAL_FLAGS[@]}" \
      --format='value(networkEndpoints.len())' 2>/dev/null || true)"
    if [[ "$actual" =~ ^[0-9]+$ && "$actual" != "$WORKERS" ]]; then
      note "gcloud reports $actual workers for $NAME (not $WORKERS from --type/--workers); using $actual"
      WORKERS="$actual"
    fi
  fi
  [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "could not determine the worker count of $NAME (got '$WORKERS'); pass --workers"
  echo "$WORKERS"
}

# ----- remote commands --------------------------------------------------------------------------------------
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL_FLAGS[@]}" --worker=all --command="$1"
}

remote_install_script() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --all --tags; else git clone $(shquote "$REPO_URL") $REMOTE_DIR; fi"
    [[ -n "$REF" ]] && fetch+=" && git -C $REMOTE_DIR checkout $(shquote "$REF")"
  else
    fetch="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
  fi
  # uv provides the Python the project needs (TPU images ship an older python3) and seeds pip into the venv.
  # shellcheck disable=SC2016  # $HOME and $PATH expand on the worker
  local steps=(
    "set -euo pipefail"
    "$fetch"
    "cd $REMOTE_DIR"
    'export PATH="$HOME/.local/bin:$PATH"'
    "command -v uv >/dev/null || python3 -m pip install --user --quiet uv"
    "[ -x .venv/bin/python ] || uv venv --seed --python $(shquote "$PYTHON_VERSION") .venv"
    ".venv/bin/python -m pip install -e '.[tpu]'"
    "bash third_party/install_jetstream.sh .venv/bin/python"
    ".venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].platform)'"
  )
  if [[ -n "$BUCKET" ]]; then
    # gcsfuse lacks directory renames unless --rename-dir-limit is set; orbax commits a checkpoint by renaming.
    steps+=(
      "command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }"
      "mkdir -p gcs"
      "mountpoint -q gcs || gcsfuse --implicit-dirs --rename-dir-limit=200000 $(shquote "$BUCKET") gcs"
    )
  fi
  local out="" step
  for step in "${steps[@]}"; do
    out+="${out:+; }$step"
  done
  printf '%s' "$out"
}

remote_run_script() {
  local workers="$1" env_words=()
  # One process per worker VM; JAX reads the slice layout from the TPU metadata server.
  (( workers > 1 )) && env_words+=("STAT_JAX_DISTRIBUTED=1")
  env_words+=("${EXTRA_ENV[@]}")
  local cmd="cd $REMOTE_DIR && mkdir -p logs/$RUN_ID && set -o pipefail && "
  if [[ ${#env_words[@]} -gt 0 ]]; then
    cmd+="env $(shjoin "${env_words[@]}") "
  fi
  cmd+=".venv/bin/stat-jax $(shjoin "${STAT_JAX_ARGS[@]}") 2>&1 | tee logs/$RUN_ID/stat-jax.log"
  printf '%s' "$cmd"
}

# ----- commands ---------------------------------------------------------------------------------------------
cmd_create() {
  require_value --type "$TYPE"
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$QR_NAME" "${GLOBAL_FLAGS[@]}" --node-id="$NAME" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${spot[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GLOBAL_FLAGS[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${spot[@]}"
  fi
}

# Under --dry-run the state is taken to be $DRY_QR_STATE (ACTIVE unless the caller says otherwise).
qr_state() {
  DRY_VALUE="${DRY_QR_STATE-ACTIVE}" capture gcloud compute tpus queued-resources describe "$QR_NAME" "${GLOBAL_FLAGS[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

wait_active() {
  local state
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) note "queued resource $QR_NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING) die "queued resource $QR_NAME is $state; see: gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE" ;;
      *) note "queued resource $QR_NAME: ${state:-not visible yet}; checking again in ${POLL_SECONDS}s"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

cmd_setup() {
  if [[ -z "$REPO_URL" ]]; then
    local tarball="${TMPDIR:-/tmp}/$REMOTE_DIR-$RUN_ID.tar.gz"
    # The working tree as it is (uncommitted edits included), without environments, runs, downloaded test models
    # (.cache) and git history.
    run tar -czf "$tarball" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./.cache \
      --exclude="./$LOGS_DIR" --exclude='*.egg-info' --exclude='__pycache__' -C "$REPO_ROOT" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${GLOBAL_FLAGS[@]}" --worker=all
  fi
  ssh_all "$(remote_install_script)"
}

cmd_logs() {
  local workers i dest
  workers="$(worker_count)"
  for (( i = 0; i < workers; i++ )); do
    dest="$LOGS_DIR/$RUN_ID/worker-$i"
    run mkdir -p "$dest"
    run gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_DIR/logs/$RUN_ID/stat-jax.log" "$dest/" \
      "${GLOBAL_FLAGS[@]}" --worker="$i" || note "worker $i: no log for run $RUN_ID"
  done
  note "logs of run $RUN_ID in $LOGS_DIR/$RUN_ID/"
}

cmd_run() {
  [[ ${#STAT_JAX_ARGS[@]} -gt 0 ]] || die "nothing to run: put the stat-jax command after --, e.g. -- sft --config=..."
  local workers rc=0
  workers="$(worker_count)"
  refuse_multi_host_serve "$workers" "a $workers-worker slice (run it on a single-host slice, e.g. v5e-8)"
  note "run $RUN_ID on $workers worker(s) of $NAME: stat-jax $(shjoin "${STAT_JAX_ARGS[@]}")"
  ssh_all "$(remote_run_script "$workers")" || rc=$?
  cmd_logs
  return "$rc"
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${GLOBAL_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GLOBAL_FLAGS[@]}" --quiet
  fi
}

# Exit status 143 is the trainers' "stopped by SIGTERM after checkpointing"; 255 is ssh losing the VM.
cmd_spot() {
  require_value --type "$TYPE"
  [[ -n "$BUCKET" ]] || die "spot needs --mount-bucket BUCKET: a re-created slice has fresh disks, so checkpoints \
must live in a bucket (and --config.workdir under gcs/)"
  [[ ${#STAT_JAX_ARGS[@]} -gt 0 ]] || die "nothing to run: put the stat-jax command after --"
  QUEUED=1
  SPOT=1
  local has_resume=0 arg
  for arg in "${STAT_JAX_ARGS[@]}"; do [[ "$arg" == --resume ]] && has_resume=1; done
  [[ "$has_resume" == 1 ]] || STAT_JAX_ARGS+=(--resume)
  local base_run="$RUN_ID" attempt state rc
  for (( attempt = 1; attempt <= MAX_ATTEMPTS; attempt++ )); do
    RUN_ID="$base_run-attempt$attempt"
    state="$(DRY_QR_STATE="" qr_state)"  # a dry run shows the path that creates the slice
    if [[ "$state" != ACTIVE ]]; then
      [[ -n "$state" ]] && { note "queued resource $QR_NAME is $state: deleting it"; cmd_delete; }
      cmd_create
      cmd_setup
    elif [[ "$attempt" == 1 ]]; then
      cmd_setup  # an existing slice may hold an older copy of the project
    fi
    rc=0
    cmd_run || rc=$?
    if [[ "$rc" == 0 ]]; then
      note "run finished (attempt $attempt)"
      [[ "$KEEP" == 1 ]] || cmd_delete
      return 0
    fi
    state="$(qr_state)"
    if [[ "$DRY_RUN" == 1 ]]; then
      note "dry run: one attempt shown; after a preemption the loop deletes, re-creates and re-runs with --resume"
      return 0
    fi
    if [[ "$state" == ACTIVE && "$rc" != 143 && "$rc" != 255 ]]; then
      die "stat-jax failed with status $rc on a healthy slice (not a preemption); $QR_NAME kept for debugging, \
logs in $LOGS_DIR/$RUN_ID/"
    fi
    note "attempt $attempt ended with status $rc, slice state '${state:-gone}': treating it as a preemption"
  done
  die "gave up after $MAX_ATTEMPTS attempts"
}

case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run ;;
  logs) cmd_logs ;;
  stop|start) run gcloud compute tpus tpu-vm "$COMMAND" "$NAME" "${GLOBAL_FLAGS[@]}" ;;
  delete) cmd_delete ;;
  spot) cmd_spot ;;
  describe)
    if [[ "$QUEUED" == 1 ]]; then
      run gcloud compute tpus queued-resources describe "$QR_NAME" "${GLOBAL_FLAGS[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$NAME" "${GLOBAL_FLAGS[@]}" \
        --format='table(name.basename(),state,acceleratorType,networkEndpoints.len():label=WORKERS)'
    fi ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac
