#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for mae_jax: create, set up, run, watch, stop, delete.
#
# Usage: launch/tpu.sh COMMAND [options] [-- extra]
#
# Commands
#   create   gcloud compute tpus tpu-vm create (args after -- go to gcloud as they are);
#            with --queued (or --num-slices=N > 1): a queued resource of N slices
#   setup    on every worker: copy this checkout (or git clone --repo), make a Python venv,
#            bash launch/setup_env.sh, pip install jax[tpu] of the installed jax version,
#            then `check`
#   check    on every worker at once: python3 launch/check_devices.py (jax must see the TPU)
#   plan     here, no TPU needed: compile the run's config and overrides for the slice
#            (--accelerator-type) with the TPU compiler (libtpu: setup_env.sh --tpu) and print
#            memory per device against HBM, collectives, the step model's time (with its
#            range and what bounds it; mae_jax.tpu.step_model) and the compiler's estimate;
#            then compile other meshes (data/FSDP), remat and gradient accumulation, rank
#            them by the step model, print hours and chip-hours, whether the input keeps
#            up, and the --config overrides of the fastest that fits (--choose=false: the
#            config alone). Compiles are cached: asked again, a plan only lowers. Exits 3
#            when the config as given does not fit
#   run      on every worker at once, detached (nohup setsid), a log per worker:
#              python3 -m mae_jax.main --config=CONFIG --workdir=WORKDIR [--config.k=v ...]
#            --config.* options, and everything after --, go to mae_jax.main unchanged.
#            With --accelerator-type, `plan` runs first and a config that does not fit is
#            refused (--force starts it anyway; --plan=false skips the compile); the
#            plan's step time goes to the run (--config.plan), which keeps it in WORKDIR and
#            logs "plan: X s/step (model), measured: Y s/step" with its first throughput.
#            Run it again on a preempted or recreated slice (after setup) to resume: the
#            train loop resumes from the latest checkpoint in WORKDIR, which is never wiped.
#            --keep-running: `watch` instead
#   watch    supervise a queued resource until the run has finished: ask for the slice(s),
#            wait, set up, run; when they are preempted or deleted ask again, set up and run
#            again (the run resumes from its newest checkpoint); a run that stops on a live
#            slice is run again. Stops when WORKDIR/finished.json appears (the run wrote it at
#            its last step: exit 0) or at a limit (exit 4). Every event goes to --events
#   logs     tail one worker's log (--worker=N, default 0; -f to follow)
#   status   the TPU's (or queued resource's) state, and the mae_jax.main processes on every worker
#   stop     end the job on every worker (pkill: TERM, then KILL after --timeout seconds)
#   delete   delete the TPU VM, or with --queued the queued resource and its slices (asks
#            for confirmation unless --yes)
#
# Settings: a flag wins over its environment variable. "--a_b" and "--a-b" are the same flag.
#   --name=NAME              TPU_NAME          required by every command
#   --zone=ZONE              ZONE              required by every command, e.g. europe-west4-a
#   --project=PROJECT        PROJECT           default: gcloud's configured project
#   --accelerator-type=TYPE  ACCELERATOR_TYPE  create, plan, run: v3-8, v3-128, v4-64,
#                                              v5litepod-16, v5p-128, v6e-256, tpu7x-128
#                                              ... (the table: python3 -m mae_jax.hardware)
#   --runtime-version=VER    RUNTIME_VERSION   create: default from the type, e.g.
#                                              tpu-ubuntu2204-base for v2, v3, v4
#   --spot                   SPOT=1            create: a Spot VM
#   --preemptible            PREEMPTIBLE=1     create: a preemptible VM (older kind of Spot)
#   --queued                 QUEUED=1          create, status, delete: through a queued
#                                              resource named --name (watch: always)
#   --reserved               RESERVED=1        create (queued): from the project's reservation
#                                              (neither --spot nor --reserved: on demand)
#   --num-slices=N           NUM_SLICES        slices joined by the data-center network (1);
#                                              N > 1: the nodes NAME-0 ... NAME-(N-1) of one
#                                              queued resource; every command covers them all
#   --max-relaunches=N       MAX_RELAUNCHES    watch: launches after the first (20)
#   --max-hours=H            MAX_HOURS         watch: stop after H hours (0: no limit)
#   --max-retries=N          MAX_RETRIES       watch: requests refused or failed in a row (10)
#   --poll=S                 POLL_SECONDS      watch: seconds between looks (60)
#   --events=FILE            EVENTS_LOG        watch: the event log (./NAME.events.log),
#                                              appended to, one UTC-stamped line per event
#   --repo=URL               REPO_URL          setup: git clone URL instead of copying this
#                                              checkout (tracked and untracked files, no .git)
#   --ref=REF                REPO_REF          setup: branch, tag or commit of --repo (HEAD)
#   --remote-dir=DIR         REMOTE_DIR        the project on the workers (mae_jax, under ~)
#   --venv=DIR               REMOTE_VENV       the venv on the workers (mae_jax_venv, under ~)
#   --python-version=V       PYTHON_VERSION    setup: the venv's Python (3.12; jax needs 3.12+)
#   --config=FILE:VARIANT    CONFIG            plan, run: e.g. configs/pretrain.py:vit_large
#   --plan=false             PLAN=0            run, watch: do not compile the plan first
#   --choose=false           CHOOSE=0          plan: compile the config only, no candidates
#   --force                  FORCE=1           run: start even if the plan does not fit
#   --workdir=gs://...       WORKDIR           run: checkpoints and summaries (must be gs://)
#   --env=KEY=VALUE                            run: export on the workers (repeatable)
#   --log-dir=DIR            REMOTE_LOG_DIR    the logs on the workers (mae_jax_logs, under ~):
#                                              DIR/worker-N.log, appended to by each run
#   --worker=W                                 which workers: all (default), 0, or 0,2;
#                                              logs: one worker, 0 by default
#   --lines=N, -n N                            logs: lines to show (100)
#   --follow, -f                               logs: keep following the log
#   --timeout=S                                stop: seconds between TERM and KILL (30)
#   --gcloud-arg=ARG         GCLOUD_ARGS       an extra argument for every gcloud ssh/scp
#                                              (repeatable; the variable splits on spaces),
#                                              e.g. --gcloud-arg=--tunnel-through-iap
#   --yes, -y                                  delete: do not ask
#   --dry-run                DRY_RUN=1         print the commands (quoted, copy-pasteable)
#                                              instead of running them
#   -h, --help                                 this help
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

truthy() { case "${1-}" in 1|true|TRUE|True|yes|YES|on) return 0 ;; *) return 1 ;; esac; }
# bool_flag ARG: 1 for "--flag" or "--flag=true", 0 for "--flag=false".
bool_flag() { if [[ "$1" != *=* ]] || truthy "${1#*=}"; then echo 1; else echo 0; fi; }

# ---- settings: environment first, flags below override ----
name=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
accelerator_type=${ACCELERATOR_TYPE:-}
runtime_version=${RUNTIME_VERSION:-}
spot=0; truthy "${SPOT:-}" && spot=1
plan=1; [[ -n "${PLAN:-}" ]] && ! truthy "$PLAN" && plan=0
choose=1; [[ -n "${CHOOSE:-}" ]] && ! truthy "$CHOOSE" && choose=0
force=0; truthy "${FORCE:-}" && force=1
preemptible=0; truthy "${PREEMPTIBLE:-}" && preemptible=1
queued=0; truthy "${QUEUED:-}" && queued=1
reserved=0; truthy "${RESERVED:-}" && reserved=1
keep_running=0
num_slices=${NUM_SLICES:-1}
max_relaunches=${MAX_RELAUNCHES:-20}
max_hours=${MAX_HOURS:-0}
max_retries=${MAX_RETRIES:-10}
poll=${POLL_SECONDS:-60}
events_log=${EVENTS_LOG:-}
repo_url=${REPO_URL:-}
repo_ref=${REPO_REF:-HEAD}
remote_dir=${REMOTE_DIR:-mae_jax}
remote_venv=${REMOTE_VENV:-mae_jax_venv}
python_version=${PYTHON_VERSION:-3.12}
config=${CONFIG:-}
workdir=${WORKDIR:-}
remote_log_dir=${REMOTE_LOG_DIR:-mae_jax_logs}
worker=""
lines=100
follow=0
stop_timeout=30
yes=0
if truthy "${DRY_RUN:-}"; then DRY_RUN=1; else DRY_RUN=0; fi
gcloud_args=()
if [[ -n "${GCLOUD_ARGS:-}" ]]; then
  read -r -a gcloud_args <<<"$GCLOUD_ARGS"
fi
env_pairs=()
job_args=()    # --config.* options and the words after --: for mae_jax.main (run)
extra_args=()  # the words after --: for gcloud (create)
command=""

while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  case "$arg" in
    --)
      extra_args=("$@")
      break ;;
    --config.*)
      job_args+=("$arg") ;;
    -h|--help)
      usage; exit 0 ;;
    -f)
      follow=1 ;;
    -y)
      yes=1 ;;
    -n)
      take_value "$arg" "$@"; lines=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --*)
      key=$(flag_key "$arg")
      case "$key" in
        --spot) spot=$(bool_flag "$arg") ;;
        --plan) plan=$(bool_flag "$arg") ;;
        --choose) choose=$(bool_flag "$arg") ;;
        --force) force=$(bool_flag "$arg") ;;
        --preemptible) preemptible=$(bool_flag "$arg") ;;
        --queued) queued=$(bool_flag "$arg") ;;
        --reserved) reserved=$(bool_flag "$arg") ;;
        --keep-running) keep_running=$(bool_flag "$arg") ;;
        --follow) follow=$(bool_flag "$arg") ;;
        --yes) yes=$(bool_flag "$arg") ;;
        --dry-run) DRY_RUN=$(bool_flag "$arg") ;;
        --name|--zone|--project|--accelerator-type|--runtime-version|--repo|--ref|\
        --remote-dir|--venv|--python-version|--config|--workdir|--env|--log-dir|--worker|\
        --lines|--timeout|--gcloud-arg|--num-slices|--max-relaunches|--max-hours|--max-retries|\
        --poll|--events)
          take_value "$arg" "$@"
          shift "$OPT_SHIFT"
          case "$key" in
            --name) name=$OPT_VALUE ;;
            --zone) zone=$OPT_VALUE ;;
            --project) project=$OPT_VALUE ;;
            --accelerator-type) accelerator_type=$OPT_VALUE ;;
            --runtime-version) runtime_version=$OPT_VALUE ;;
            --repo) repo_url=$OPT_VALUE ;;
            --ref) repo_ref=$OPT_VALUE ;;
            --remote-dir) remote_dir=$OPT_VALUE ;;
            --venv) remote_venv=$OPT_VALUE ;;
            --python-version) python_version=$OPT_VALUE ;;
            --config) config=$OPT_VALUE ;;
            --workdir) workdir=$OPT_VALUE ;;
            --env) env_pairs+=("$OPT_VALUE") ;;
            --log-dir) remote_log_dir=$OPT_VALUE ;;
            --worker) worker=$OPT_VALUE ;;
            --lines) lines=$OPT_VALUE ;;
            --timeout) stop_timeout=$OPT_VALUE ;;
            --gcloud-arg) gcloud_args+=("$OPT_VALUE") ;;
            --num-slices) num_slices=$OPT_VALUE ;;
            --max-relaunches) max_relaunches=$OPT_VALUE ;;
            --max-hours) max_hours=$OPT_VALUE ;;
            --max-retries) max_retries=$OPT_VALUE ;;
            --poll) poll=$OPT_VALUE ;;
            --events) events_log=$OPT_VALUE ;;
          esac ;;
        *) die "unknown option: $arg (see --help)" ;;
      esac ;;
    -*)
      die "unknown option: $arg (see --help)" ;;
    *)
      [[ -z "$command" ]] || die "unexpected argument: $arg (one command at a time; see --help)"
      command=$arg ;;
  esac
done

[[ -n "$command" ]] || { usage >&2; die "no command given: create, setup, check, plan, run, watch, logs, status, stop or delete"; }
case "$command" in
  create|setup|check|plan|run|watch|logs|status|stop|delete) ;;
  *) die "unknown command: $command (create, setup, check, plan, run, watch, logs, status, stop or delete)" ;;
esac
[[ "$command" == run && "$keep_running" == 1 ]] && command=watch
if [[ ${#job_args[@]} -gt 0 && "$command" != run && "$command" != plan && "$command" != watch ]]; then
  die "--config.* overrides are for 'run', 'watch' and 'plan' only"
fi
if [[ ${#extra_args[@]} -gt 0 && "$command" != create && "$command" != run && "$command" != plan && "$command" != watch ]]; then
  die "arguments after -- are for 'create' (gcloud) and 'run'/'watch'/'plan' (mae_jax.main) only"
fi
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive number, got: $num_slices"
[[ "$num_slices" == 1 ]] || queued=1  # several slices: one queued resource holds them
[[ "$command" == watch ]] && queued=1
if [[ ( "$command" == run || "$command" == plan || "$command" == watch ) && ${#extra_args[@]} -gt 0 ]]; then
  job_args+=("${extra_args[@]}")
  extra_args=()
fi

if [[ "$command" != plan ]]; then
  require "$name" --name TPU_NAME "TPU name"
  require "$zone" --zone ZONE "zone"
fi
GCLOUD=${GCLOUD:-gcloud}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${LAUNCH_PYTHON:-python3}

# ---- helpers ----
# The gcloud words every call shares: GROUP VERB NAME --zone [--project], in TPU_VM_CMD.
tpus() {
  local group=$1 verb=$2
  shift 2
  local cmd=("$GCLOUD" compute tpus "$group" "$verb" "$@" "--zone=$zone")
  [[ -z "$project" ]] || cmd+=("--project=$project")
  TPU_VM_CMD=("${cmd[@]}")
}
tpu_vm() { tpus tpu-vm "$@"; }

# The TPU VMs (nodes): NAME, or the NAME-0 ... NAME-(N-1) of a multi-slice queued resource.
nodes=("$name")
if [[ "$num_slices" -gt 1 ]]; then
  nodes=()
  for ((i = 0; i < num_slices; i++)); do nodes+=("$name-$i"); done
fi
node=${nodes[0]}  # the node remote() reaches
# each_node CMD ARG...: CMD for every node in turn (remote() reaching it); stops at a failure.
each_node() {
  local n
  for n in "${nodes[@]}"; do
    node=$n
    "$@" || { local rc=$?; node=${nodes[0]}; return "$rc"; }
  done
  node=${nodes[0]}
}

# remote WORKERS SCRIPT: run a bash script on the workers of `node`, all at once.
# The script travels as `bash -c '<script>'`, single-quoted, so whatever login shell the
# workers have, bash gets the script byte for byte.
remote() {
  local workers=$1 script=$2
  tpu_vm ssh "$node" "--worker=$workers"
  run_cmd "${TPU_VM_CMD[@]}" ${gcloud_args[@]+"${gcloud_args[@]}"} \
    "--command=bash -c $(shell_quote "$script")"
}

# home_path PATH: PATH for a remote script, relative paths taken from the home directory.
home_path() {
  local p=${1#\~/}
  if [[ "$p" == /* ]]; then shell_quote "$p"; else printf '"%s"/%s' "\$HOME" "$(shell_quote "$p")"; fi
}

# slice_field FIELD TYPE: one field of an accelerator type from the slice table
# (mae_jax/hardware.py, the one source of truth); fails for an unknown type.
slice_field() {
  (cd "$ROOT" && "$PYTHON" -m mae_jax.hardware "$1" "$2" 2>/dev/null)
}

# The job's processes: python3 -m mae_jax.main, the interpreter's path in front or not.
# Anchored, so it never matches a shell whose command line merely mentions mae_jax.main.
JOB_PATTERN='^[^ ]*python[^ ]* -m mae_jax[.]main( |$)'
# ... as a remote script line that sets $pat (double quotes: keeps the scripts free of ').
set_pat="pat=\"${JOB_PATTERN//\$/\\\$}\""
q_dir=$(home_path "$remote_dir")
q_venv=$(home_path "$remote_venv")
q_logs=$(home_path "$remote_log_dir")
# Script lines that enter the project with the venv's python3 first on PATH.
enter_project="set -euo pipefail; cd \"\$HOME\"; cd $q_dir; export VIRTUAL_ENV=$q_venv; export PATH=\"\$VIRTUAL_ENV/bin:\$PATH\""
# This worker's number: from the TPU metadata server, else the host name.
# shellcheck disable=SC2016  # expanded on the worker
worker_id='w=${MAE_WORKER_ID:-}; if [ -z "$w" ]; then w=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || true); fi; [ -n "$w" ] || w=$(hostname)'

cmd_create() {
  require "$accelerator_type" --accelerator-type ACCELERATOR_TYPE "accelerator type"
  if [[ -z "$runtime_version" ]]; then
    runtime_version=$(slice_field runtime "$accelerator_type") \
      || die "unknown accelerator type $accelerator_type (python3 -m mae_jax.hardware lists the known ones), so no default runtime: pass --runtime-version=... or set RUNTIME_VERSION"
  fi
  [[ "$spot" == 1 && "$preemptible" == 1 ]] && die "--spot and --preemptible exclude each other"
  if [[ "$queued" == 1 ]]; then
    queued_create_cmd
    run_cmd "${QR_CREATE[@]}"
    return
  fi
  [[ "$reserved" == 0 ]] || die "--reserved is for queued resources: add --queued"
  tpu_vm create "$name" "--accelerator-type=$accelerator_type" "--version=$runtime_version"
  local cmd=("${TPU_VM_CMD[@]}")
  [[ "$spot" == 0 ]] || cmd+=(--spot)
  [[ "$preemptible" == 0 ]] || cmd+=(--preemptible)
  run_cmd "${cmd[@]}" ${extra_args[@]+"${extra_args[@]}"}
}

# The gcloud command that asks for the queued resource, in QR_CREATE.
queued_create_cmd() {
  [[ "$spot" == 1 && "$reserved" == 1 ]] && die "--spot and --reserved exclude each other"
  [[ "$preemptible" == 0 ]] || die "queued resources take --spot or --reserved (or neither: on demand), not --preemptible"
  tpus queued-resources create "$name" "--accelerator-type=$accelerator_type" \
    "--runtime-version=$runtime_version"
  QR_CREATE=("${TPU_VM_CMD[@]}")
  if [[ "$num_slices" -gt 1 ]]; then
    QR_CREATE+=("--node-count=$num_slices" "--node-prefix=$name")
  else
    QR_CREATE+=("--node-id=$name")
  fi
  [[ "$spot" == 0 ]] || QR_CREATE+=(--spot)
  [[ "$reserved" == 0 ]] || QR_CREATE+=(--reserved)
  QR_CREATE+=(${extra_args[@]+"${extra_args[@]}"})
}

cmd_check() {
  each_node remote "${worker:-all}" "$enter_project; python3 launch/check_devices.py"
}

cmd_setup() {
  local fetch
  if [[ -n "$repo_url" ]]; then
    local q_url q_ref
    q_url=$(shell_quote "$repo_url")
    q_ref=$(shell_quote "$repo_ref")
    fetch="if [ ! -d $q_dir/.git ]; then git clone --quiet $q_url $q_dir; fi; git -C $q_dir fetch --quiet origin $q_ref; git -C $q_dir checkout --quiet --force FETCH_HEAD"
  else
    # This checkout, as one tarball: tracked and untracked files, no .git or build output.
    local root tmp bundle
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ -n "${WATCH_TMP:-}" ]]; then  # watch: its own folder, removed at its exit
      tmp=$(mktemp -d "$WATCH_TMP/setup.XXXXXX")
    else
      tmp=$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_setup.XXXXXX")
      # shellcheck disable=SC2064  # expand now: $tmp is local
      trap "rm -rf '$tmp'" EXIT
    fi
    bundle="$tmp/mae_jax_bundle.tgz"
    export COPYFILE_DISABLE=1  # no macOS ._ files in the tarball
    run_cmd tar -C "$root" -czf "$bundle" --exclude=.git --exclude=__pycache__ \
      --exclude='*.pyc' --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./workdirs \
      --exclude=./build --exclude=./.whl --exclude='./.venv*' .
    local n
    for n in "${nodes[@]}"; do
      tpu_vm scp "$bundle" "$n:mae_jax_bundle.tgz" "--worker=${worker:-all}"
      run_cmd "${TPU_VM_CMD[@]}" ${gcloud_args[@]+"${gcloud_args[@]}"}
    done
    fetch="mkdir -p $q_dir; tar -xzf \"\$HOME\"/mae_jax_bundle.tgz -C $q_dir; rm -f \"\$HOME\"/mae_jax_bundle.tgz"
  fi
  local q_py
  q_py=$(shell_quote "$python_version")
  # uv gives a Python of the wanted version whatever the image ships (jax needs 3.12+).
  local script="set -euo pipefail; cd \"\$HOME\"; $fetch"
  script+="; export PATH=\"\$HOME/.local/bin:\$PATH\""
  script+="; command -v uv >/dev/null || python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
  script+="; [ -x $q_venv/bin/python3 ] || uv venv --seed --python $q_py $q_venv"
  script+="; cd \"\$HOME\"; cd $q_dir; export VIRTUAL_ENV=$q_venv; export PATH=\"\$VIRTUAL_ENV/bin:\$PATH\""
  script+="; bash launch/setup_env.sh --tpu"
  script+="; echo \"\$(hostname): set up, jax[tpu] \$(python3 -c \"import jax; print(jax.__version__)\")\""
  each_node remote "${worker:-all}" "$script"
  cmd_check
}

# The compile of the run's config (and its --config.* overrides) for the slice, here; with
# CHOOSE=1 (the default of `plan`; `run` passes 0) the candidates too, ranked.
cmd_plan() {
  local search=${1:-$choose}
  require "$accelerator_type" --accelerator-type ACCELERATOR_TYPE "accelerator type"
  require "$config" --config CONFIG "config (e.g. configs/pretrain.py:vit_large)"
  local overrides=() a
  for a in ${job_args[@]+"${job_args[@]}"}; do
    [[ "$a" != --config.* ]] || overrides+=("$a")
  done
  # The choice is made for one slice; several are compiled as the config gives them.
  [[ "$search" == 0 || "$num_slices" -gt 1 ]] || overrides+=(--choose)
  [[ "$num_slices" == 1 ]] || overrides+=("--num_slices=$num_slices")
  [[ -z "${PLAN_OUT-}" ]] || overrides+=("--plan_out=$PLAN_OUT")
  local rc=0
  (cd "$ROOT" && run_cmd "$PYTHON" -m mae_jax.tools.scaling "--topology=$accelerator_type" \
    "--config=$config" ${overrides[@]+"${overrides[@]}"} --check_fits) || rc=$?
  if [[ "$rc" == 3 ]]; then
    warn "the TPU compiler says $config does not fit in the HBM of $accelerator_type."
    if [[ "$search" == 1 ]]; then
      warn "The ranking above says what fits instead: add the overrides it prints."
    fi
    warn "Fixes: shard the state (--config.mesh.fsdp=N, N > 1), remat (--config.model.remat=True), a smaller batch per device (a larger slice, or --config.batch_size), or --config.grad_accum_steps=K."
  elif [[ "$rc" != 0 ]]; then
    warn "the plan of $config for $accelerator_type failed (exit $rc); see above."
  fi
  return "$rc"
}

check_run_settings() {
  require "$config" --config CONFIG "config (e.g. configs/pretrain.py:vit_large)"
  require "$workdir" --workdir WORKDIR "workdir (gs://bucket/path)"
  [[ "$workdir" == gs://?* ]] \
    || die "--workdir must be a gs:// path that every worker can reach, got: $workdir"
  local pair
  for pair in ${env_pairs[@]+"${env_pairs[@]}"}; do
    [[ "$pair" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got: $pair"
  done
}

# The plan of the config that is about to run, alone; refuses a config that does not fit.
plan_before_run() {
  [[ -n "$accelerator_type" && "$plan" == 1 ]] || return 0
  local rc=0
  PLAN_OUT=$(mktemp)  # the step model's time for it: the run's first throughput line shows it
  cmd_plan 0 || rc=$?
  if [[ -s "$PLAN_OUT" ]]; then job_args+=("--config.plan=$(cat "$PLAN_OUT")"); fi
  rm -f "$PLAN_OUT"
  if [[ "$rc" != 0 && "$force" == 1 ]]; then
    warn "--force: starting anyway."
  elif [[ "$rc" != 0 ]]; then
    die "not started: the plan failed (exit $rc). --force starts it anyway; --plan=false skips the plan."
  fi
}

# Starts the job on every worker of every node, detached; each worker writes its log and the
# job's pid (worker-N.log, worker-N.pid).
launch_job() {
  local exports="" pair
  for pair in ${env_pairs[@]+"${env_pairs[@]}"}; do
    exports+="; export ${pair%%=*}=$(shell_quote "${pair#*=}")"
  done
  local job
  job=$(quote_cmd python3 -m mae_jax.main "--config=$config" "--workdir=$workdir" \
    ${job_args[@]+"${job_args[@]}"})
  local script="$enter_project$exports; $worker_id; $set_pat"
  script+="; if pgrep -f \"\$pat\" >/dev/null; then echo \"worker \$w: a mae_jax.main job is already running here; stop it first (launch/tpu.sh stop)\" >&2; exit 1; fi"
  script+="; mkdir -p $q_logs; log=$q_logs/worker-\$w.log; job=($job)"
  script+="; { printf \"=== %s:\" \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\"; printf \" %q\" \"\${job[@]}\"; echo; } >>\"\$log\""
  script+="; nohup setsid \"\${job[@]}\" >>\"\$log\" 2>&1 </dev/null & echo \$! >\"\${log%.log}.pid\"; echo \"worker \$w: started pid \$! on \$(hostname), log \$log\""
  each_node remote "${worker:-all}" "$script"
}

cmd_run() {
  check_run_settings
  plan_before_run
  launch_job
}

cmd_logs() {
  is_uint "$lines" || die "--lines must be a number, got: $lines"
  local tail_cmd="tail -n $lines"
  [[ "$follow" == 0 ]] || tail_cmd+=" -F"
  remote "${worker:-0}" "set -eu; cd \"\$HOME\"; set -- $q_logs/worker-*.log; if [ ! -e \"\$1\" ]; then echo \"\$(hostname): no log in $remote_log_dir (not started with run yet?)\" >&2; exit 1; fi; exec $tail_cmd \"\$@\""
}

cmd_status() {
  if [[ "$queued" == 1 ]]; then
    tpus queued-resources describe "$name"
    run_cmd "${TPU_VM_CMD[@]}" '--format=yaml(state,tpu.nodeSpec,spot,guaranteed,reservationName)'
  else
    tpu_vm describe "$name"
    run_cmd "${TPU_VM_CMD[@]}" '--format=table(state,health,acceleratorType,runtimeVersion,schedulingConfig)'
  fi
  each_node remote "${worker:-all}" "$set_pat; echo \"\$(hostname):\"; pgrep -af \"\$pat\" || echo \"  no mae_jax.main job running\""
}

cmd_stop() {
  is_uint "$stop_timeout" || die "--timeout must be a number of seconds, got: $stop_timeout"
  local script="$set_pat"
  script+="; if ! pgrep -f \"\$pat\" >/dev/null; then echo \"\$(hostname): no mae_jax.main job running\"; exit 0; fi"
  script+="; pkill -TERM -f \"\$pat\" || true; i=0"
  script+="; while pgrep -f \"\$pat\" >/dev/null && [ \$i -lt $stop_timeout ]; do sleep 1; i=\$((i + 1)); done"
  script+="; if pgrep -f \"\$pat\" >/dev/null; then pkill -KILL -f \"\$pat\" || true; echo \"\$(hostname): killed (still running after ${stop_timeout}s)\"; else echo \"\$(hostname): stopped\"; fi"
  each_node remote "${worker:-all}" "$script"
}

cmd_delete() {
  if [[ "$queued" == 1 ]]; then
    tpus queued-resources delete "$name" --force  # its nodes too
  else
    tpu_vm delete "$name"
  fi
  local cmd=("${TPU_VM_CMD[@]}")
  [[ "$yes" == 0 ]] || cmd+=(--quiet)
  run_cmd "${cmd[@]}"
}

# ---- watch: the supervisor
# event TEXT: one line in the event log (and on stderr), stamped with the UTC time.
event() {
  local line
  line="$(date -u +%Y-%m-%dT%H:%M:%SZ) $*"
  printf '%s\n' "$line" >>"$events_log"
  printf '%s: %s\n' "$PROG" "$line" >&2
}

# Sets QR_STATE (the queued resource's state; ABSENT when there is none; UNKNOWN when gcloud
# failed otherwise) and QR_REASON (why it failed, in gcloud's words).
describe_queued() {
  local out rc=0
  tpus queued-resources describe "$name"
  out=$("${TPU_VM_CMD[@]}" '--format=value(state.state,state.failedData.error.message)' \
    2>"$WATCH_TMP/err") || rc=$?
  QR_REASON=""
  if [[ "$rc" != 0 ]]; then
    QR_REASON=$(grep -v '^ *$' "$WATCH_TMP/err" | tail -n 1 || true)  # gcloud may say nothing
    if grep -qi 'not.found' "$WATCH_TMP/err"; then QR_STATE=ABSENT QR_REASON=""; else QR_STATE=UNKNOWN; fi
    return 0
  fi
  QR_STATE=${out%%$'\t'*}
  [[ "$out" != *$'\t'* ]] || QR_REASON=${out#*$'\t'}
}

# Sets JOB_STATE from worker 0 of the first node: FINISHED (WORKDIR/finished.json exists),
# RUNNING (its job's pid is alive), STOPPED, or UNKNOWN (no answer).
job_state() {
  local check out
  check=$(quote_cmd python3 -c "import sys; from etils import epath; sys.exit(0 if epath.Path(sys.argv[1]).exists() else 1)" "$workdir/finished.json")
  # Not $enter_project: on a slice not set up yet its `cd` fails, and that is a plain STOPPED.
  local script="cd \"\$HOME\"; $worker_id; pid=$q_logs/worker-\$w.pid"
  script+="; if (cd $q_dir && export VIRTUAL_ENV=$q_venv && export PATH=\"\$VIRTUAL_ENV/bin:\$PATH\" && $check) 2>/dev/null; then echo FINISHED; elif [ -f \"\$pid\" ] && kill -0 \"\$(cat \"\$pid\")\" 2>/dev/null; then echo RUNNING; else echo STOPPED; fi"
  node=${nodes[0]}
  tpu_vm ssh "$node" --worker=0
  out=$("${TPU_VM_CMD[@]}" ${gcloud_args[@]+"${gcloud_args[@]}"} \
    "--command=bash -c $(shell_quote "$script")" 2>>"$WATCH_TMP/ssh.err") || true
  # No answer (a worker slow to reply, ssh refused) is UNKNOWN, and asked again at the next poll.
  JOB_STATE=$(printf '%s\n' "$out" | grep -E '^(FINISHED|RUNNING|STOPPED)$' | tail -n 1 || true)
  JOB_STATE=${JOB_STATE:-UNKNOWN}
}

# attempt LOG CMD ARG...: CMD in a subshell that stops at its first failure, its output appended
# to LOG; its status in ATTEMPT_RC. (Called as `if CMD`, bash would ignore -e all through CMD.)
attempt() {
  local log=$1
  shift
  set +e
  (set -e; "$@") >>"$log" 2>&1
  ATTEMPT_RC=$?
  set -e
}

# give_up WHY: the supervisor stops at a limit; the slice is left as it is.
give_up() {
  event "stopping: $1; the queued resource $name is left as it is (launch/tpu.sh delete --queued)"
  exit 4
}

cmd_watch() {
  check_run_settings
  require "$accelerator_type" --accelerator-type ACCELERATOR_TYPE "accelerator type"
  [[ "$DRY_RUN" == 0 ]] || die "watch runs gcloud again and again; --dry-run shows what create and run would run"
  is_uint "$max_relaunches" || die "--max-relaunches must be a whole number, got: $max_relaunches"
  is_uint "$max_retries" || die "--max-retries must be a whole number, got: $max_retries"
  [[ "$poll" =~ ^[0-9]*\.?[0-9]+$ ]] || die "--poll must be a number of seconds, got: $poll"
  local limit_s
  limit_s=$(awk -v h="$max_hours" 'BEGIN { if (h !~ /^[0-9]*\.?[0-9]+$/) exit 1; printf "%d", h * 3600 }') \
    || die "--max-hours must be a number of hours, got: $max_hours"
  [[ -n "$runtime_version" ]] || runtime_version=$(slice_field runtime "$accelerator_type") \
    || die "unknown accelerator type $accelerator_type: pass --runtime-version=..."
  events_log=${events_log:-$PWD/$name.events.log}
  WATCH_TMP=$(mktemp -d "${TMPDIR:-/tmp}/mae_jax_watch.XXXXXX")
  # shellcheck disable=SC2064  # expand now
  trap "rm -rf '$WATCH_TMP'" EXIT
  plan_before_run
  queued_create_cmd
  local launches=0 failures=0 on_slice=0 last="" started=$SECONDS
  event "watching queued resource $name ($num_slices x $accelerator_type$([[ "$spot" == 1 ]] && echo ", Spot")$([[ "$reserved" == 1 ]] && echo ", reserved")) for $config in $workdir; limits: $max_relaunches relaunches, $max_retries failed requests in a row, ${max_hours} h (0: none)"
  while true; do
    if [[ "$limit_s" -gt 0 && $((SECONDS - started)) -ge "$limit_s" ]]; then
      give_up "--max-hours=$max_hours reached"
    fi
    describe_queued
    [[ "$QR_STATE" == "$last" ]] || [[ "$QR_STATE" == ACTIVE ]] \
      || event "queued resource $name: $QR_STATE${QR_REASON:+ ($QR_REASON)}"
    case "$QR_STATE" in
      ABSENT)
        [[ "$on_slice" == 0 ]] || { event "the slice is gone (deleted or preempted)"; on_slice=0; }
        if "${QR_CREATE[@]}" >"$WATCH_TMP/out" 2>"$WATCH_TMP/err"; then
          event "requested: $(quote_cmd "${QR_CREATE[@]}")"
        else
          failures=$((failures + 1))
          event "request refused ($failures in a row): $(grep -v '^ *$' "$WATCH_TMP/err" | tail -n 1)"
          [[ "$failures" -lt "$max_retries" ]] || give_up "--max-retries=$max_retries requests in a row refused or failed"
        fi ;;
      FAILED)
        failures=$((failures + 1))
        [[ "$failures" -lt "$max_retries" ]] || give_up "--max-retries=$max_retries requests in a row refused or failed"
        event "deleting the failed request, to ask again ($failures failed in a row)"
        tpus queued-resources delete "$name" --force --quiet
        "${TPU_VM_CMD[@]}" >/dev/null 2>&1 || true ;;
      SUSPENDING|SUSPENDED)
        [[ "$on_slice" == 0 ]] || { event "preempted: the run stops with the slice ($QR_STATE)"; on_slice=0; }
        # While SUSPENDING the workers have their notice: they save a checkpoint and exit.
        [[ "$QR_STATE" == SUSPENDED ]] || { last=$QR_STATE; sleep "$poll"; continue; }
        event "deleting the suspended queued resource, to ask again"
        tpus queued-resources delete "$name" --force --quiet
        "${TPU_VM_CMD[@]}" >/dev/null 2>&1 || true ;;
      ACTIVE)
        failures=0
        job_state
        if [[ "$JOB_STATE" == UNKNOWN ]]; then
          # Whether a job runs there is not known: never set up or launch over one.
          event "no answer from ${nodes[0]} worker 0 on the run's state; asking again"
          last=$QR_STATE; sleep "$poll"; continue
        elif [[ "$on_slice" == 0 && ( "$JOB_STATE" == RUNNING || "$JOB_STATE" == FINISHED ) ]]; then
          on_slice=1  # a watch started again finds the job it started before
          event "queued resource $name: ACTIVE, the run there: $JOB_STATE"
        elif [[ "$on_slice" == 0 ]]; then
          [[ "$last" == ACTIVE ]] || event "queued resource $name: ACTIVE; setting up ${nodes[*]}"
          attempt "$WATCH_TMP/setup.log" cmd_setup
          if [[ "$ATTEMPT_RC" != 0 ]]; then
            event "set-up failed; trying again: $(tail -n 1 "$WATCH_TMP/setup.log")"
            last=$QR_STATE; sleep "$poll"; continue
          fi
          on_slice=1
          JOB_STATE=NEW
        fi
        case "$JOB_STATE" in
          FINISHED)
            event "finished: $workdir/finished.json is there, after $launches launch(es)"
            return 0 ;;
          NEW|STOPPED)
            [[ "$launches" -le "$max_relaunches" ]] || give_up "--max-relaunches=$max_relaunches reached"
            [[ "$JOB_STATE" == NEW ]] || event "the run stopped without finishing on a live slice"
            attempt "$WATCH_TMP/launch.log" launch_job
            if [[ "$ATTEMPT_RC" == 0 ]]; then
              launches=$((launches + 1))
              event "launched (launch $launches$([[ "$launches" -gt 1 ]] && echo ", relaunch $((launches - 1)) of at most $max_relaunches"): resumes from the newest checkpoint in $workdir)"
            else
              event "launch failed: $(tail -n 1 "$WATCH_TMP/launch.log")"
            fi ;;
        esac ;;
    esac
    last=$QR_STATE
    sleep "$poll"
  done
}

# One statement ending in exit: bash has read all of it before the command runs, so a checkout
# updated while `watch` runs (days) cannot feed it the new file's text from the old offset.
case "$command" in
  create) cmd_create ;; setup) cmd_setup ;; check) cmd_check ;; plan) cmd_plan ;; run) cmd_run ;;
  watch) cmd_watch ;; logs) cmd_logs ;; status) cmd_status ;; stop) cmd_stop ;; delete) cmd_delete ;;
esac; exit
