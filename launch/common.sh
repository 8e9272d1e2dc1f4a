# Helpers sourced by launch/tpu.sh and launch/gpu.sh (not executable on its own).
# shellcheck shell=bash

# 1 = print each command instead of running it (set by --dry-run).
DRY_RUN="${DRY_RUN:-0}"
# fd 3 is the script's stdout, so dry-run lines printed inside $(...) still reach the user.
exec 3>&1

die() {
  echo "error: $*" >&2
  exit 2
}

note() {
  echo "[launch] $*" >&2
}

# Quotes one word for a POSIX shell: plain words stay readable, anything else is single-quoted.
shquote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: the result is one shell command line.
shjoin() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shquote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it (one line, copy-pasteable) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(shjoin "$@")" >&3
  else
    printf '+ %s\n' "$(shjoin "$@")" >&2
    "$@"
  fi
}

# Like run, but for commands whose output the script reads; under --dry-run prints and echoes $DRY_VALUE.
capture() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(shjoin "$@")" >&3
    printf '%s\n' "${DRY_VALUE:-}"
  else
    "$@"
  fi
}

require_value() {
  [[ -n "$2" ]] || die "$1 is required (see --help)"
}

require_tool() {
  [[ "$DRY_RUN" == 1 ]] || command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}

# A run id for log directories: UTC time, sortable, no spaces.
new_run_id() {
  date -u +%Y%m%d-%H%M%S
}

# `stat-jax serve` is a single-host server (stat_jax/cli.py refuses several processes too): say so before any
# host is touched. $1 = the process count, $2 = what the launch would start.
refuse_multi_host_serve() {
  if (( $1 > 1 )) && [[ "${STAT_JAX_ARGS[0]:-}" == serve ]]; then
    die "stat-jax serve is a single-host server and cannot run as one job over $2"
  fi
}
