#!/usr/bin/env bash
# A simulated pod on this machine: N processes on localhost that form one JAX job.
#
# Usage: launch/local.sh --num_processes=N [options] -- MAIN_ARGS...
#   e.g. launch/local.sh --num_processes=2 --devices_per_process=4 -- \
#          --config=configs/pretrain.py:tiny --workdir=workdirs/pod2 --config.note="a b"
#
# Process i runs, with JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=D (added to any other XLA_FLAGS):
#   $LAUNCH_PYTHON -m mae_jax.main MAIN_ARGS... --coordinator_address=127.0.0.1:PORT \
#     --num_processes=N --process_id=i --heartbeat_timeout_seconds=H
# writing LOG_DIR/process_i.log (a --heartbeat_timeout_seconds among MAIN_ARGS replaces
# the one added). It waits for all of them. When one exits non-zero the others get SIGTERM
# (SIGKILL after --grace_period seconds), and it exits non-zero naming that process and
# showing its log's tail. SIGTERM to this script is a preemption of the whole pod: it is
# passed on to every process, which all save the same step and exit; the script exits 0
# when all of them exited 0. On Ctrl-C (SIGINT), SIGHUP or any exit, every process it
# started is stopped the same way, with all of its children (each runs in its own process
# group); a second signal kills them at once.
#
# Options (a flag wins over its environment variable; "--a_b" and "--a-b" are the same flag)
#   --num_processes=N        NUM_PROCESSES        required
#   --devices_per_process=D  DEVICES_PER_PROCESS  CPU devices per process (1)
#   --port=P                 PORT                 coordinator port (default: a free one)
#   --log_dir=DIR            LOG_DIR              default: WORKDIR/logs for a local
#                                                 --workdir, else a new temporary folder
#   --grace_period=S         GRACE_PERIOD         seconds from SIGTERM to SIGKILL (60: time
#                                                 to save a checkpoint and exit on a busy CPU)
#   --heartbeat_timeout_seconds=H
#                            HEARTBEAT_TIMEOUT_SECONDS
#                                                 a process silent this long counts as dead
#                                                 and the others stop with an error (20)
#   --dry-run                DRY_RUN=1            print the commands instead of running them
#   -h, --help                                    this help
# Environment: LAUNCH_PYTHON, the Python to run (default: python, else python3).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

num_processes=${NUM_PROCESSES:-}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-}
log_dir=${LOG_DIR:-}
grace=${GRACE_PERIOD:-60}
heartbeat=${HEARTBEAT_TIMEOUT_SECONDS:-20}
case "${DRY_RUN:-}" in 1|true|yes) DRY_RUN=1 ;; *) DRY_RUN=0 ;; esac
main_args=()

while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  case "$arg" in
    --) main_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --*)
      key=$(flag_key "$arg")
      case "$key" in
        --dry-run) DRY_RUN=1 ;;
        --num-processes|--devices-per-process|--port|--log-dir|--grace-period|--heartbeat-timeout-seconds)
          take_value "$arg" "$@"
          shift "$OPT_SHIFT"
          case "$key" in
            --num-processes) num_processes=$OPT_VALUE ;;
            --devices-per-process) devices=$OPT_VALUE ;;
            --port) port=$OPT_VALUE ;;
            --log-dir) log_dir=$OPT_VALUE ;;
            --grace-period) grace=$OPT_VALUE ;;
            --heartbeat-timeout-seconds) heartbeat=$OPT_VALUE ;;
          esac ;;
        *) die "unknown option: $arg (mae_jax.main's arguments go after --; see --help)" ;;
      esac ;;
    *) die "unexpected argument: $arg (mae_jax.main's arguments go after --; see --help)" ;;
  esac
done

require "$num_processes" --num_processes NUM_PROCESSES "number of processes"
[[ "$num_processes" =~ ^[0-9]+$ && "$num_processes" -ge 1 ]] \
  || die "--num_processes must be a positive number, got: $num_processes"
[[ "$devices" =~ ^[0-9]+$ && "$devices" -ge 1 ]] \
  || die "--devices_per_process must be a positive number, got: $devices"
is_uint "$grace" || die "--grace_period must be a number of seconds, got: $grace"
[[ "$heartbeat" =~ ^[0-9]+$ && "$heartbeat" -ge 1 ]] \
  || die "--heartbeat_timeout_seconds must be a positive number of seconds, got: $heartbeat"

if [[ -n "${LAUNCH_PYTHON:-}" ]]; then
  python=$LAUNCH_PYTHON
elif command -v python >/dev/null; then
  python=python
else
  python=python3
fi

if [[ -z "$port" ]]; then
  # A port the kernel says is free now; another program could still take it before use.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null) \
    || port=$((20000 + RANDOM % 40000))
fi
[[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]] || die "--port must be 1..65535, got: $port"

# The workdir among mae_jax.main's arguments, for the default log folder; a heartbeat
# timeout there replaces ours.
workdir=""
heartbeat_flag=("--heartbeat_timeout_seconds=$heartbeat")
for ((i = 0; i < ${#main_args[@]}; i++)); do
  case "${main_args[i]}" in
    --workdir=*) workdir=${main_args[i]#--workdir=} ;;
    --workdir) workdir=${main_args[i + 1]:-} ;;
    --heartbeat_timeout_seconds|--heartbeat_timeout_seconds=*) heartbeat_flag=() ;;
  esac
done
if [[ -z "$log_dir" ]]; then
  if [[ -n "$workdir" && "$workdir" != *://* ]]; then
    log_dir="$workdir/logs"
  elif [[ "$DRY_RUN" == 1 ]]; then
    log_dir="${TMPDIR:-/tmp}/mae_jax_local.XXXXXX"
  else
    log_dir=$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_local.XXXXXX")
  fi
fi

# Our device count replaces any --xla_force_host_platform_device_count already set.
xla_flags=""
read -r -a old_flags <<<"${XLA_FLAGS:-}"
for flag in ${old_flags[@]+"${old_flags[@]}"}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

process_cmd() {  # process_cmd I: the command of process I, in PROC_CMD
  PROC_CMD=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "$python" -m mae_jax.main
    ${main_args[@]+"${main_args[@]}"} "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$num_processes" "--process_id=$1" ${heartbeat_flag[@]+"${heartbeat_flag[@]}"})
}

if [[ "$DRY_RUN" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    process_cmd "$i"
    printf '%s >%s 2>&1 &\n' "$(quote_cmd "${PROC_CMD[@]}")" "$(shell_quote "$log_dir/process_$i.log")"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()       # pids[i]: process i, the leader of its own process group; "" once reaped
remaining=0

# signal_all SIGNAL: send SIGNAL to every live process's group.
signal_all() {
  local i
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [[ -n "${pids[i]}" ]] || continue
    kill "-$1" -- "-${pids[i]}" 2>/dev/null || kill "-$1" "${pids[i]}" 2>/dev/null || true
  done
}

# reap I: if process I has ended, record it and set REAPED_RC; returns 1 while it runs.
reap() {
  local pid=${pids[$1]}
  [[ -n "$pid" ]] || return 1
  if kill -0 "$pid" 2>/dev/null; then return 1; fi
  REAPED_RC=0
  wait "$pid" || REAPED_RC=$?
  pids[$1]=""
  remaining=$((remaining - 1))
  # A killed leader may leave children in its group: end them too.
  kill -KILL -- "-$pid" 2>/dev/null || true
}

# stop_all: SIGTERM to all, SIGKILL to whatever is left after the grace period, reap all.
# Sets STOPPED_CLEANLY=1 when every process it reaped had exited 0.
stop_all() {
  local i waited=0
  STOPPED_CLEANLY=1
  [[ "$remaining" -gt 0 ]] || return 0
  signal_all TERM
  while [[ "$remaining" -gt 0 && "$waited" -lt $((grace * 10)) ]]; do
    for ((i = 0; i < ${#pids[@]}; i++)); do
      if reap "$i" && [[ "$REAPED_RC" -ne 0 ]]; then STOPPED_CLEANLY=0; fi
    done
    [[ "$remaining" -gt 0 ]] || break
    sleep 0.1
    waited=$((waited + 1))
  done
  if [[ "$remaining" -gt 0 ]]; then
    warn "$remaining process(es) still running ${grace}s after SIGTERM: killing them"
    signal_all KILL
    for ((i = 0; i < ${#pids[@]}; i++)); do
      [[ -n "${pids[i]}" ]] || continue
      wait "${pids[i]}" 2>/dev/null || true
      pids[i]=""
    done
    remaining=0
    STOPPED_CLEANLY=0
  fi
}

# on_signal NAME: pass SIGTERM on (mae_jax.main saves a checkpoint and exits 0 on it, every
# process at the same step) and wait for all; a second signal kills them at once.
on_signal() {
  trap 'warn "second signal: killing all processes"; signal_all KILL' INT TERM HUP
  warn "got SIG$1: stopping all $num_processes processes (SIGTERM: they save a checkpoint and" \
    "exit; SIGKILL after ${grace}s, or at a second signal)"
  stop_all
  case "$1" in INT) exit 130 ;; HUP) exit 129 ;; esac
  if [[ "$STOPPED_CLEANLY" == 1 ]]; then
    warn "all $num_processes processes exited 0 after SIGTERM; relaunch the same command to resume"
    exit 0
  fi
  warn "not every process exited 0 after SIGTERM; logs in $log_dir"
  exit 143
}
trap stop_all EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

warn "starting $num_processes processes (coordinator 127.0.0.1:$port, $devices CPU devices each), logs in $log_dir"
set -m  # each background process gets a process group of its own, to stop with its children
for ((i = 0; i < num_processes; i++)); do
  process_cmd "$i"
  "${PROC_CMD[@]}" >"$log_dir/process_$i.log" 2>&1 </dev/null &
  pids[i]=$!
  remaining=$((remaining + 1))
done
set +m

while [[ "$remaining" -gt 0 ]]; do
  for ((i = 0; i < ${#pids[@]}; i++)); do
    reap "$i" || continue
    if [[ "$REAPED_RC" -ne 0 ]]; then
      failed=$i
      rc=$REAPED_RC
      log="$log_dir/process_$failed.log"
      warn "process $failed exited with status $rc; stopping the others"
      stop_all
      warn "process $failed failed (exit status $rc); last lines of $log:"
      tail -n 20 "$log" >&2 || true
      exit "$rc"
    fi
  done
  sleep 0.2
done
warn "all $num_processes processes finished; logs in $log_dir"
