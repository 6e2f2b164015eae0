#!/usr/bin/env bash
# Cloud TPU VMs (a pod slice or a single host) for dalle_jax: create one, copy this working
# tree to every worker, run a job on all workers at once, follow it, stop it, delete the VM.
#
#   launch/tpu_run.sh create --tpu=NAME --zone=ZONE --accelerator=v4-32 [--spot]
#   launch/tpu_run.sh setup  --tpu=NAME --zone=ZONE
#   launch/tpu_run.sh run    --tpu=NAME --zone=ZONE -- python3 -m dalle_jax.tools.train ...
#   launch/tpu_run.sh logs | ssh | stop | delete ...
#
# `launch/tpu_run.sh -h` lists every subcommand and flag. What `run` does, in order:
#   1. describes the TPU VM (state, accelerator type, number of workers);
#   2. checks here, ahead of time, that the job's --config fits the slice's topology
#      (dalle_jax.tools.compile; --skip-fit-check skips it), before the pod's time is spent;
#   3. a preflight on every worker: same jax and libtpu versions everywhere, no process
#      holding the TPU devices, no stale libtpu lock, no stale MEGASCALE_* variables;
#   4. starts the command on every worker (one `gcloud ... ssh --worker=N` each, in the
#      background), each in its own session recorded in ~/dalle_jax/.job.pid, so that `stop`
#      kills exactly the job. One local log per worker; worker 0 is shown here. When a
#      worker's command fails, the job is stopped on every other worker (fail fast).
#
# Remote snippets are kept to POSIX sh (the login shell of the workers runs them) and to
# one line each, so that --dry-run prints every gcloud command on one line.
set -euo pipefail

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "error: launch/tpu_run.sh needs bash 5.1 or newer (this is $BASH_VERSION)" >&2
  exit 2
fi

readonly REMOTE_DIR="dalle_jax"  # under the home folder on each worker
readonly JOB_PID_FILE=".job.pid"  # in REMOTE_DIR: the job's process group (= session) id
readonly LIBTPU_LOCK="/tmp/libtpu_lockfile"
readonly WORKER_NUMBER_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
readonly QUEUED_ABOVE=64  # `create` makes a queued resource for larger slices (v4-128, ...)
readonly DEFAULT_GRACE=30  # seconds between SIGTERM and SIGKILL when stopping a job
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly LOGS_ROOT="$REPO_ROOT/runs/tpu_logs"

usage() {
  cat <<'EOF'
usage: launch/tpu_run.sh SUBCOMMAND --tpu=NAME --zone=ZONE [--project=PROJECT] [--dry-run]
                         [OPTIONS] [-- COMMAND [ARG...]]

Subcommands:
  create   create the TPU VM NAME (a queued resource for slices above 64, or with --queued)
             --accelerator=TYPE   accelerator type, e.g. v4-32, v5litepod-16, v5p-64, v6e-16
                                  (required)
             --runtime=VERSION    TPU software version (default per generation:
                                  tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite for
                                  v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
             --spot               spot capacity (cheaper, can be preempted)
             --queued             a queued resource, whatever the size (waits for capacity)
             --no-queued          a plain TPU VM, whatever the size
  setup    copy this working tree (without .venv .git runs __pycache__ *.egg-info) to
           ~/dalle_jax on every worker, replacing the previous copy but keeping its runs/,
           and install it there (pip install -e '.[tpu]'); refused while a job runs
  run      run COMMAND in ~/dalle_jax on every worker: a fit check here, a preflight on the
           workers, then the job; fails fast (a failed worker stops the others)
             --env=KEY=VALUE      set KEY for the job (repeatable)
             --env=KEY            pass KEY's value from this shell (an error if unset)
             --logs-dir=DIR       local logs: DIR/worker-N.log (and fit_check.log,
                                  preflight.log, stop.log); default
                                  runs/tpu_logs/NAME-YYYYmmdd-HHMMSS
             --stream=N|all       worker shown here, tagged "[worker N]" (default 0; the
                                  others only go to their logs)
             --accelerator=TYPE   the slice's type for the fit check (default: described;
                                  an error if it differs)
             --skip-fit-check     do not check that the config fits the slice
             --kill-stale         kill processes holding the TPU (and an earlier run's job)
                                  instead of failing the preflight
             --grace=SECONDS      when stopping: time between SIGTERM and SIGKILL (30)
           COMMAND runs as a program with its arguments, passed on word by word unchanged
           (use bash -c '...' for shell syntax). Ctrl-C stops the job on every worker.
  logs     show the end of the worker logs of the latest local run (of NAME, when --tpu is
           given; --zone is not needed)
             --logs-dir=DIR       that run's logs instead
             --worker=N           one worker's log
             --follow             keep following the logs (tail -f)
             --lines=N            lines per log (default 40)
  ssh      an interactive shell on a worker, or COMMAND (a shell command line, as ssh takes
           it) run in ~/dalle_jax on the workers, each output line tagged "[worker N]"
             --worker=N|all       default: 0 for a shell, all for COMMAND
  stop     stop the job started by `run` on every worker (SIGTERM, then SIGKILL after the
           grace period); the VM stays up
             --grace=SECONDS      (default 30)
  delete   delete the TPU VM, or its queued resource (found out unless --queued is given)
             --queued             NAME is a queued resource
             --yes                do not ask for confirmation (gcloud --quiet)

Common flags:
  --tpu=NAME        TPU VM name (and queued resource name)
  --zone=ZONE       its zone, e.g. us-central2-b
  --project=P       Google Cloud project (default: gcloud's configured one)
  --dry-run         print the commands, one per line, instead of running them
  -h, --help        this help

Examples:
  launch/tpu_run.sh create --tpu=my-v4-32 --zone=us-central2-b --accelerator=v4-32 --spot
  launch/tpu_run.sh setup --tpu=my-v4-32 --zone=us-central2-b
  launch/tpu_run.sh run --tpu=my-v4-32 --zone=us-central2-b --env=TF_CPP_MIN_LOG_LEVEL=1 -- \
      python3 -m dalle_jax.tools.train --config=configs/image_tokenizer_shapes.py \
      --workdir=gs://my-bucket/runs/dvae_shapes
  launch/tpu_run.sh logs --tpu=my-v4-32 --worker=1
  launch/tpu_run.sh ssh --tpu=my-v4-32 --zone=us-central2-b -- 'pgrep -af python3 || true'
  launch/tpu_run.sh stop --tpu=my-v4-32 --zone=us-central2-b
  launch/tpu_run.sh delete --tpu=my-v4-32 --zone=us-central2-b --yes
EOF
}

usage_error() {
  echo "error: $1" >&2
  usage >&2
  exit 2
}

note() { echo "tpu_run: $*" >&2; }
error() { echo "error: $*" >&2; }
die() { error "$*"; exit 1; }

# --- helpers -------------------------------------------------------------------------

# The arguments as one line of shell words: plain words as they are, others in single
# quotes, so that a shell reading the line gets the same arguments back.
quote_words() {
  local word quoted=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      quoted+=("$word")
    else
      quoted+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${quoted[*]}"
}

# Runs a command, or prints it (quoted, one line) under --dry-run.
run_or_print() {
  if $dry_run; then
    quote_words "$@"
  else
    "$@"
  fi
}

# Joins a script read from stdin into one line: blank and comment lines dropped, leading
# blanks removed, "; " between lines, except after a line ending in a word that continues
# the command (then, do, else, {, &&, ||, |, &). Used on fixed snippets only: values that
# may hold newlines are spliced in with join_statements.
one_line() {
  local line out=""
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    if [[ "$line" =~ (^|[[:space:]])(then|do|else|\{|\&\&|\|\||\||\&)$ ]]; then
      out+="$line "
    else
      out+="$line; "
    fi
  done
  printf '%s' "${out%; }"
}

# Joins shell statements into one line ("a; b", but "a & b" after a background "&").
join_statements() {
  local out="" statement
  for statement in "$@"; do
    if [[ -n "$out" ]]; then
      if [[ "$out" == *'&' && "$out" != *'&&' ]]; then out+=" "; else out+="; "; fi
    fi
    out+="$statement"
  done
  printf '%s' "$out"
}

# NAME=VALUE arguments as one statement of shell assignments, values quoted.
assignments() {
  local pair out=()
  for pair in "$@"; do
    out+=("${pair%%=*}=$(quote_words "${pair#*=}")")
  done
  printf '%s' "${out[*]}"
}

# Python that prints jax=VERSION and libtpu=VERSION ("none" when not installed) from the
# installed packages' metadata, without importing jax (fast, touches no device).
readonly VERSIONS_PY='import importlib.metadata as m; d = {(x.metadata["Name"] or "").lower().replace("_", "-"): x.version for x in m.distributions()}; print("jax=" + d.get("jax", "none")); print("libtpu=" + d.get("libtpu", d.get("libtpu-nightly", "none")))'

# Sets $worker on the worker: its number from the metadata server, else its hostname;
# and say(), which prints a line tagged with it.
worker_prelude() {
  one_line <<'EOF'
worker=$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "$url" 2>/dev/null) || worker=""
if [ -z "$worker" ]; then worker=$(hostname); fi
say() { echo "[worker $worker] $1"; }
# Whether a process of session $1 (the job: setsid makes it a session and a process
# group) is still running; zombies do not count.
alive() { ps -o stat= -s "$1" 2>/dev/null | grep -qv '^Z'; }
EOF
}

# --- remote snippets -----------------------------------------------------------------

# The preflight, on every worker. Prints "[worker N] key=value" lines, read by preflight():
# setup=ok|missing, jax=, libtpu=, running_job=PGID, holder=PID COMMAND, killed=...,
# lock=removed PATH, megascale=NAME, warn=..., and preflight=done last.
preflight_snippet() {
  join_statements \
    "$(assignments url="$WORKER_NUMBER_URL" dir="$REMOTE_DIR" pidfile="$JOB_PID_FILE" \
        lock="$LIBTPU_LOCK" versions_py="$VERSIONS_PY" kill_stale="$kill_stale")" \
    "$(worker_prelude)" \
    "$(one_line <<'EOF'
if [ -d "$HOME/$dir" ]; then say "setup=ok"; else say "setup=missing"; fi
python3 -c "$versions_py" 2>/dev/null | while IFS= read -r line; do say "$line"; done
# The job of an earlier run, still running?
job=$(cat "$HOME/$dir/$pidfile" 2>/dev/null) || job=""
if [ -n "$job" ] && alive "$job"; then
  if [ "$kill_stale" = true ]; then
    kill -KILL -"$job" 2>/dev/null
    say "killed=process group $job (the job of an earlier run)"
  else
    say "running_job=$job"
  fi
fi
# Processes holding the TPU: chips are /dev/accel* on v2-v4, /dev/vfio/N on v5e and later.
sudo_=""
if sudo -n true 2>/dev/null; then sudo_="sudo -n"; else say "warn=no password-less sudo: only this user's processes were checked"; fi
holders() { $sudo_ lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -un; }
pids=$(holders)
if [ -n "$pids" ] && [ "$kill_stale" = true ]; then
  for pid in $pids; do say "killed=$pid $(ps -o args= -p "$pid" 2>/dev/null)"; done
  $sudo_ kill -9 $pids 2>/dev/null
  sleep 1
  pids=$(holders)
fi
for pid in $pids; do say "holder=$pid $(ps -o args= -p "$pid" 2>/dev/null)"; done
# libtpu's lock file outlives a crashed process and makes the next one fail to start.
if [ -z "$pids" ] && [ -e "$lock" ]; then
  if rm -f "$lock" 2>/dev/null || $sudo_ rm -f "$lock"; then say "lock=removed $lock"; else say "warn=could not remove $lock"; fi
fi
env | sed -n 's/^\(MEGASCALE_[A-Za-z0-9_]*\)=.*/\1/p' | while IFS= read -r name; do say "megascale=$name"; done
say "preflight=done"
EOF
)"
}

# The job, on one worker: COMMAND in its own session (setsid), whose id goes to the pid
# file for `stop`; the worker's exit status is the command's.
job_snippet() {
  local pair exports=()
  for pair in "${job_env[@]}"; do
    exports+=("export $(assignments "$pair")")
  done
  join_statements \
    "$(assignments dir="$REMOTE_DIR" pidfile="$JOB_PID_FILE")" \
    "$(one_line <<'EOF'
cd "$HOME/$dir" || { echo "error: ~/$dir is missing: run launch/tpu_run.sh setup first"; exit 1; }
export PYTHONUNBUFFERED=1
EOF
)" \
    "${exports[@]}" \
    "setsid $(quote_words "${command[@]}") &" \
    "$(one_line <<'EOF'
job=$!
echo "$job" > "$pidfile"
# A signal to this shell (ssh hung up) stops the job too.
trap 'kill -TERM -"$job" 2>/dev/null' HUP INT TERM
status=0
wait "$job" || status=$?
# wait returns early when a trapped signal arrives: wait again until the job is gone.
while kill -0 "$job" 2>/dev/null && ps -o stat= -p "$job" | grep -qv '^Z'; do status=0; wait "$job" || status=$?; done
if [ "$(cat "$pidfile" 2>/dev/null)" = "$job" ]; then rm -f "$pidfile"; fi
exit "$status"
EOF
)"
}

# Stops the job on a worker: SIGTERM to its process group (dalle_jax jobs save a checkpoint
# and exit), SIGKILL after the grace period.
stop_snippet() {
  join_statements \
    "$(assignments url="$WORKER_NUMBER_URL" dir="$REMOTE_DIR" pidfile="$JOB_PID_FILE" \
        grace="$grace")" \
    "$(worker_prelude)" \
    "$(one_line <<'EOF'
job=$(cat "$HOME/$dir/$pidfile" 2>/dev/null) || job=""
if [ -z "$job" ] || ! alive "$job"; then
  say "no job running"
else
  kill -TERM -"$job" 2>/dev/null
  waited=0
  while alive "$job" && [ "$waited" -lt "$grace" ]; do sleep 1; waited=$((waited + 1)); done
  if alive "$job"; then
    kill -KILL -"$job" 2>/dev/null
    say "killed the job (process group $job) after ${grace}s"
  else
    say "stopped the job (process group $job)"
  fi
fi
rm -f "$HOME/$dir/$pidfile"
EOF
)"
}

# Puts the copied tree (~/$incoming) in place of ~/dalle_jax, keeping its runs/, and installs.
setup_snippet() {
  join_statements \
    "$(assignments url="$WORKER_NUMBER_URL" dir="$REMOTE_DIR" pidfile="$JOB_PID_FILE" \
        incoming="$1" versions_py="$VERSIONS_PY")" \
    "$(worker_prelude)" \
    "$(one_line <<'EOF'
job=$(cat "$HOME/$dir/$pidfile" 2>/dev/null) || job=""
if [ -n "$job" ] && alive "$job"; then
  say "error: a job is running (process group $job): stop it first (launch/tpu_run.sh stop)"
  rm -rf "${HOME:?}/$incoming"
  exit 1
fi
if [ -d "$HOME/$dir/runs" ]; then mv "$HOME/$dir/runs" "$HOME/$incoming/runs"; fi
rm -rf "${HOME:?}/$dir" && mv "$HOME/$incoming" "$HOME/$dir" || exit 1
# Left over from set-ups that failed half-way.
rm -rf "${HOME:?}/$dir".incoming-*
cd "$HOME/$dir" || exit 1
if python3 -m pip install --quiet -e '.[tpu]' > .pip-install.log 2>&1; then
  say "installed: $(python3 -c "$versions_py" | tr '\n' ' ')"
else
  say "error: pip install -e '.[tpu]' failed; its last lines:"
  tail -n 20 .pip-install.log | sed "s/^/[worker $worker]   /"
  exit 1
fi
EOF
)"
}

# A shell command line in ~/dalle_jax on a worker, its output tagged, its status kept.
ssh_snippet() {
  join_statements \
    "$(assignments url="$WORKER_NUMBER_URL" dir="$REMOTE_DIR" line="$1")" \
    "$(worker_prelude)" \
    "$(one_line <<'EOF'
cd "$HOME/$dir" 2>/dev/null || cd
status_file=$(mktemp)
# A subshell: an "exit N" in the line ends only it, with status N.
{ (eval "$line"); echo "$?" > "$status_file"; } 2>&1 | sed -u "s/^/[worker $worker] /"
status=$(cat "$status_file"); rm -f "$status_file"
exit "${status:-1}"
EOF
)"
}

# --- arguments ----------------------------------------------------------------------

readonly SUBCOMMANDS="create setup run logs ssh stop delete"
declare -A OPTIONS_OF=(
  [create]="accelerator runtime spot queued no-queued"
  [setup]=""
  [run]="env logs-dir stream accelerator skip-fit-check kill-stale grace"
  [logs]="logs-dir worker follow lines"
  [ssh]="worker"
  [stop]="grace"
  [delete]="queued yes"
)

subcommand="" tpu="" zone="" project="" dry_run=false
accelerator="" runtime="" spot=false queued="" logs_dir="" stream=0 skip_fit_check=false
kill_stale=false grace="$DEFAULT_GRACE" worker="" follow=false lines=40 yes=false
job_env=() given=() command=() has_command=false

parse_args() {
  local arg name
  while (($#)); do
    arg="$1"
    shift
    case "$arg" in
      --) has_command=true; command=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --*) ;;
      *)
        if [[ -z "$subcommand" ]]; then
          [[ " $SUBCOMMANDS " == *" $arg "* ]] ||
            usage_error "unknown subcommand '$arg' (one of: $SUBCOMMANDS; a command to run goes after --)"
          subcommand="$arg"
          continue
        fi
        usage_error "unexpected argument '$arg' (a command to run goes after --)"
        ;;
    esac
    name="${arg%%=*}"
    name="${name#--}"
    case "$arg" in
      --tpu=*) tpu="${arg#*=}" ;;
      --zone=*) zone="${arg#*=}" ;;
      --project=*) project="${arg#*=}" ;;
      --dry-run) dry_run=true ;;
      --accelerator=*) accelerator="${arg#*=}" ;;
      --runtime=*) runtime="${arg#*=}" ;;
      --spot) spot=true ;;
      --queued) queued=true ;;
      --no-queued) queued=false ;;
      --env=*) job_env+=("${arg#*=}") ;;
      --logs-dir=*) logs_dir="${arg#*=}" ;;
      --stream=*) stream="${arg#*=}" ;;
      --skip-fit-check) skip_fit_check=true ;;
      --kill-stale) kill_stale=true ;;
      --grace=*) grace="${arg#*=}" ;;
      --worker=*) worker="${arg#*=}" ;;
      --follow) follow=true ;;
      --lines=*) lines="${arg#*=}" ;;
      --yes) yes=true ;;
      *) usage_error "unknown flag '$arg'" ;;
    esac
    given+=("$name")
  done

  [[ -n "$subcommand" ]] ||
    usage_error "no subcommand: give one of: $SUBCOMMANDS (setup, then run, replace the old one-step form)"
  for name in "${given[@]}"; do
    case " tpu zone project dry-run ${OPTIONS_OF[$subcommand]} " in
      *" $name "*) ;;
      *) usage_error "--$name is not a flag of '$subcommand'" ;;
    esac
  done
  if [[ "$subcommand" != logs ]]; then
    [[ -n "$tpu" ]] || usage_error "--tpu=NAME is required"
    [[ -n "$zone" ]] || usage_error "--zone=ZONE is required"
  fi
  if $has_command && [[ "$subcommand" != run && "$subcommand" != ssh ]]; then
    usage_error "'$subcommand' takes no command after --"
  fi
  [[ "$grace" =~ ^[0-9]+$ ]] || usage_error "--grace takes a number of seconds, not '$grace'"
  [[ "$lines" =~ ^[0-9]+$ ]] || usage_error "--lines takes a number, not '$lines'"
  [[ "$stream" =~ ^([0-9]+|all)$ ]] || usage_error "--stream takes a worker number or all, not '$stream'"
  if [[ -n "$worker" ]]; then
    [[ "$worker" =~ ^([0-9]+|all)$ ]] || usage_error "--worker takes a worker number or all, not '$worker'"
    [[ "$subcommand" == ssh || "$worker" != all ]] || usage_error "logs --worker takes a worker number"
  fi
  if [[ -n "$accelerator" ]]; then
    [[ "$accelerator" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
      usage_error "--accelerator takes a type such as v4-32 or v5litepod-16, not '$accelerator'"
  fi

  gcloud_flags=(--zone="$zone")
  if [[ -n "$project" ]]; then
    gcloud_flags+=(--project="$project")
  fi
}

# Checks --env and leaves job_env as KEY=VALUE pairs.
resolve_job_env() {
  local entry key resolved=()
  for entry in "${job_env[@]}"; do
    key="${entry%%=*}"
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
      usage_error "--env=$entry: '$key' is not a variable name"
    if [[ "$entry" == *=* ]]; then
      resolved+=("$entry")
    else
      [[ -n "${!key+set}" ]] || usage_error "--env=$key: $key is not set here"
      resolved+=("$key=${!key}")
    fi
  done
  job_env=("${resolved[@]}")
}

# --- create / delete ---------------------------------------------------------------------

default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

cmd_create() {
  [[ -n "$accelerator" ]] || usage_error "create needs --accelerator=TYPE, e.g. v4-32"
  if [[ -z "$runtime" ]]; then
    runtime="$(default_runtime "$accelerator")" ||
      usage_error "no default runtime for $accelerator: give --runtime=VERSION"
  fi
  local size="${accelerator##*-}"
  if [[ -z "$queued" ]]; then
    queued=false
    if ((size > QUEUED_ABOVE)); then
      queued=true
      note "$accelerator is a large slice: creating a queued resource, which waits for capacity (--no-queued: a plain VM)"
    fi
  fi
  local spot_flag=()
  if $spot; then spot_flag=(--spot); fi
  if $queued; then
    run_or_print gcloud compute tpus queued-resources create "$tpu" --node-id="$tpu" \
        "${gcloud_flags[@]}" --accelerator-type="$accelerator" --runtime-version="$runtime" \
        "${spot_flag[@]}"
    $dry_run || note "queued; follow it with: gcloud compute tpus queued-resources describe $tpu ${gcloud_flags[*]}"
  else
    run_or_print gcloud compute tpus tpu-vm create "$tpu" "${gcloud_flags[@]}" \
        --accelerator-type="$accelerator" --version="$runtime" "${spot_flag[@]}"
  fi
  $dry_run || note "next: launch/tpu_run.sh setup --tpu=$tpu ${gcloud_flags[*]}"
}

cmd_delete() {
  local quiet=()
  if $yes; then quiet=(--quiet); fi
  local delete_queued=(gcloud compute tpus queued-resources delete "$tpu" "${gcloud_flags[@]}" --force "${quiet[@]}")
  local delete_vm=(gcloud compute tpus tpu-vm delete "$tpu" "${gcloud_flags[@]}" "${quiet[@]}")
  local describe_queued=(gcloud compute tpus queued-resources describe "$tpu" "${gcloud_flags[@]}" --format='value(name)')
  if [[ "$queued" == true ]]; then
    run_or_print "${delete_queued[@]}"
  elif $dry_run; then
    quote_words "${describe_queued[@]}"
    echo "# if that finds a queued resource:"
    quote_words "${delete_queued[@]}"
    echo "# otherwise:"
    quote_words "${delete_vm[@]}"
  elif "${describe_queued[@]}" >/dev/null 2>&1; then
    note "$tpu is a queued resource: deleting it with its TPU VM"
    "${delete_queued[@]}"
  else
    "${delete_vm[@]}"
  fi
}

# --- setup ---------------------------------------------------------------------------

cmd_setup() {
  # scp cannot exclude paths, so the tree is staged first, under a name of its own: each
  # worker then swaps it in for ~/dalle_jax (so files deleted here go there too).
  local incoming staging_dir
  incoming="$REMOTE_DIR.incoming-$(date +%Y%m%d-%H%M%S)-$$"
  if $dry_run; then
    staging_dir="$(mktemp -d -u)"
    echo "# stage $REPO_ROOT without .venv .git runs __pycache__ *.egg-info in $staging_dir/$incoming"
  else
    staging_dir="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: staging_dir is local to this function
    trap "rm -rf '$staging_dir'" EXIT
    mkdir "$staging_dir/$incoming"
    tar -C "$REPO_ROOT" --exclude=./.venv --exclude=./.git --exclude=./runs \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache -cf - . \
      | tar -C "$staging_dir/$incoming" -xf -
    note "copying the working tree to every worker of $tpu"
  fi
  run_or_print gcloud compute tpus tpu-vm scp --recurse "$staging_dir/$incoming" "$tpu:~/" \
      --worker=all "${gcloud_flags[@]}"
  $dry_run || note "installing on every worker (pip install -e '.[tpu]')"
  run_or_print gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}" \
      --command="$(setup_snippet "$incoming")"
}

# --- run -----------------------------------------------------------------------------

tpu_type="" num_workers=""

# Sets tpu_type and num_workers from `describe`; the VM must be READY.
describe_tpu() {
  local out state type endpoints
  out="$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" \
      --format='value(state,acceleratorType,networkEndpoints[].ipAddress)')" ||
    die "could not describe the TPU VM '$tpu' in $zone (see gcloud's message above)"
  IFS=$'\t' read -r state type endpoints <<<"$out"
  [[ "$state" == READY ]] || die "the TPU VM '$tpu' is ${state:-in no known state}, not READY"
  tpu_type="$type"
  # One network endpoint per worker, ';'-separated.
  read -r -a endpoints <<<"${endpoints//;/ }"
  num_workers="${#endpoints[@]}"
  ((num_workers > 0)) || die "the TPU VM '$tpu' lists no workers (networkEndpoints)"
}

# The --config=... of COMMAND and its --config.* overrides, for the fit check.
config_spec="" config_args=()
find_config_args() {
  local i arg
  for ((i = 0; i < ${#command[@]}; i++)); do
    arg="${command[i]}"
    case "$arg" in
      --config=*) config_spec="${arg#--config=}"; config_args+=("$arg") ;;
      --config)
        config_spec="${command[i + 1]:-}"
        config_args+=("--config=$config_spec")
        i=$((i + 1))
        ;;
      --config.*=*) config_args+=("$arg") ;;
      --config.*)  # "--config.key value"
        config_args+=("$arg")
        if ((i + 1 < ${#command[@]})) && [[ "${command[i + 1]}" != -* ]]; then
          config_args+=("${command[i + 1]}")
          i=$((i + 1))
        fi
        ;;
    esac
  done
}

# The job's config must fit the slice: compiled ahead of time here, for the slice's
# topology, by dalle_jax.tools.compile (exit 0: fits, 1: does not fit, 2: usage error).
fit_check() {
  local topology="$1"
  if $skip_fit_check; then
    note "fit check: skipped (--skip-fit-check)"
    return
  fi
  find_config_args
  if [[ -z "$config_spec" ]]; then
    note "fit check: skipped: the command has no --config= (not a dalle_jax job)"
    return
  fi
  local python="${PYTHON:-}"
  if [[ -z "$python" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
      python="$REPO_ROOT/.venv/bin/python"
    else
      python=python3
    fi
  fi
  local check=("$python" -m dalle_jax.tools.compile "${config_args[@]}" --topology="$topology")
  if $dry_run; then
    echo "# fit check, here, in $REPO_ROOT:"
    quote_words "${check[@]}"
    return
  fi
  note "fit check: does $config_spec fit a $topology slice? $(quote_words "${check[@]}")"
  local status=0
  (cd "$REPO_ROOT" && "${check[@]}") 2>&1 | tee "$logs_dir/fit_check.log" >&2 || status=$?
  case "$status" in
    0) note "fit check: $config_spec fits a $topology slice" ;;
    1) die "the fit check found that $config_spec does not fit a $topology slice (its message is above); the job was not started. Make the config smaller (see its --config.* overrides) or the slice larger; --skip-fit-check skips the check" ;;
    2) error "the fit check could not check $config_spec: a usage or config error (above); the job was not started"; exit 2 ;;
    *) die "the fit check failed with status $status (see above and $logs_dir/fit_check.log); the job was not started; --skip-fit-check skips the check" ;;
  esac
}

# Lists its arguments sorted as numbers when they are (worker numbers), space-separated.
sorted_workers() {
  printf '%s\n' "$@" | sort -n | paste -sd ' ' -
}

# Runs the preflight snippet on every worker and stops the launch on any problem.
preflight() {
  local step=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}"
              --command="$(preflight_snippet)")
  if $dry_run; then
    quote_words "${step[@]}"
    return
  fi
  note "preflight on every worker: jax and libtpu versions, TPU devices, libtpu lock, MEGASCALE_*"
  local out status=0
  out="$("${step[@]}" </dev/null 2>&1)" || status=$?
  printf '%s\n' "$out" >"$logs_dir/preflight.log"

  local line w key value explicit_env=" ${job_env[*]%%=*} "
  local -A jax_of=() libtpu_of=() done_of=() workers_with=()
  local problems=() notes=()
  while IFS= read -r line; do
    [[ "$line" =~ \[worker\ ([^]]+)\]\ ([a-z_]+)=(.*)$ ]] || continue
    w="${BASH_REMATCH[1]}" key="${BASH_REMATCH[2]}" value="${BASH_REMATCH[3]}"
    case "$key" in
      setup) [[ "$value" == ok ]] || problems+=("worker $w: ~/$REMOTE_DIR is missing: run launch/tpu_run.sh setup first") ;;
      jax) jax_of[$w]="$value" ;;
      libtpu) libtpu_of[$w]="$value" ;;
      running_job) problems+=("worker $w: the job of an earlier run is still running (process group $value): launch/tpu_run.sh stop --tpu=$tpu ${gcloud_flags[*]}, or run with --kill-stale") ;;
      holder) problems+=("worker $w: process ${value%% *} holds the TPU devices (${value#* }): kill it, or run with --kill-stale") ;;
      killed) notes+=("worker $w: killed $value") ;;
      lock) notes+=("worker $w: removed the stale libtpu lock ${value#removed }") ;;
      megascale)
        [[ "$explicit_env" == *" $value "* ]] ||
          problems+=("worker $w: $value is set in the workers' environment (left over from a multislice set-up?): unset it there (e.g. in ~/.bashrc), or set it for the job with --env=$value=...")
        ;;
      warn) notes+=("worker $w: $value") ;;
      preflight) done_of[$w]=1 ;;
    esac
  done <<<"$out"

  for w in $(sorted_workers "${!done_of[@]}"); do
    local versions="jax ${jax_of[$w]:-unknown}, libtpu ${libtpu_of[$w]:-unknown}"
    note "preflight: worker $w: $versions"
    workers_with[$versions]+=" $w"
    [[ "${jax_of[$w]:-none}" != none ]] || problems+=("worker $w: jax is not installed for python3: run launch/tpu_run.sh setup")
    [[ "${libtpu_of[$w]:-none}" != none ]] || problems+=("worker $w: libtpu is not installed for python3: run launch/tpu_run.sh setup")
  done
  if ((${#workers_with[@]} > 1)); then
    local groups="" versions reference="jax ${jax_of[0]:-unknown}, libtpu ${libtpu_of[0]:-unknown}" differ=()
    for versions in "${!workers_with[@]}"; do
      groups+="${groups:+; }$versions on worker(s)${workers_with[$versions]}"
      [[ "$versions" == "$reference" ]] || differ+=("${workers_with[$versions]# }")
    done
    problems+=("the workers have different jax/libtpu versions: $groups. Workers that differ from worker 0: ${differ[*]}. Run launch/tpu_run.sh setup again")
  fi
  if ((${#done_of[@]} < num_workers)); then
    problems+=("only ${#done_of[@]} of $num_workers workers finished the preflight (those that did: $(sorted_workers "${!done_of[@]}"); gcloud's exit status $status)")
  elif ((status != 0)); then
    problems+=("gcloud ssh --worker=all exited with status $status")
  fi

  for line in "${notes[@]}"; do note "$line"; done
  if ((${#problems[@]})); then
    for line in "${problems[@]}"; do error "$line"; done
    die "the preflight failed: the job was not started (the workers' answers: $logs_dir/preflight.log)"
  fi
  note "preflight: all $num_workers workers ready"
}

# Stops the job on every worker (the `stop` subcommand's snippet), its output to stderr.
stop_everywhere() {
  local step=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}"
              --command="$(stop_snippet)")
  if [[ -n "$logs_dir" && -d "$logs_dir" ]]; then
    "${step[@]}" </dev/null 2>&1 | tee -a "$logs_dir/stop.log" >&2
  else
    "${step[@]}" </dev/null >&2
  fi
}

interrupted=false

# A timer that start_and_wait waits for with the workers: sets its caller's $watchdog.
start_watchdog() {
  sleep "$DEFAULT_GRACE" >/dev/null 2>&1 &
  watchdog=$!
}

# Starts the job on every worker, each with its own gcloud ssh in the background, and
# waits; the first failure stops the job on all the other workers. (The preflight's single
# ssh --worker=all has already set up the ssh keys, so these do not race to add them.)
start_and_wait() {
  local job w step fifo
  job="$(job_snippet)"
  local -A worker_of_pid=()
  local readers=()
  trap 'interrupted=true' INT TERM
  for ((w = 0; w < num_workers; w++)); do
    step=(gcloud compute tpus tpu-vm ssh "$tpu" --worker="$w" "${gcloud_flags[@]}" --command="$job")
    if [[ "$stream" == all || "$stream" == "$w" ]]; then
      # Through a fifo, so that $! is gcloud's own pid (for the watchdog below).
      fifo="$logs_dir/.worker-$w.fifo"
      mkfifo "$fifo"
      tee -a "$logs_dir/worker-$w.log" <"$fifo" |
        awk -v tag="[worker $w] " '{ print tag $0; fflush() }' &
      readers+=("$!")
      "${step[@]}" </dev/null >"$fifo" 2>&1 &
    else
      "${step[@]}" </dev/null >>"$logs_dir/worker-$w.log" 2>&1 &
    fi
    worker_of_pid[$!]="$w"
  done
  note "started on $num_workers worker(s) of $tpu; logs: $logs_dir (launch/tpu_run.sh logs --tpu=$tpu)"

  local failed=() first_status=0 stopping=false finished status watchdog="" watchdog_rounds=0
  while ((${#worker_of_pid[@]})); do
    # Ctrl-C or TERM stop the job everywhere: a signal that interrupted the wait below, or
    # one that came before it (while the workers were being started), whose trap ran then.
    if $interrupted && ! $stopping; then
      stopping=true
      note "interrupted: stopping the job on every worker"
      stop_everywhere || true
      start_watchdog
    fi
    finished="" status=0
    wait -n -p finished "${!worker_of_pid[@]}" ${watchdog:+"$watchdog"} || status=$?
    if [[ -z "${finished:-}" ]]; then
      continue  # interrupted by a signal: handled at the top of the loop
    fi
    if [[ "$finished" == "${watchdog:-}" ]]; then
      # Workers still running long after the stop: ssh again (a worker whose job had not
      # yet started then), and after that give up on them here.
      watchdog=""
      watchdog_rounds=$((watchdog_rounds + 1))
      if ((watchdog_rounds == 1)); then
        note "worker(s) $(sorted_workers "${worker_of_pid[@]}") still running: stopping again"
        stop_everywhere || true
        start_watchdog
      else
        note "worker(s) $(sorted_workers "${worker_of_pid[@]}") still running: closing their ssh here"
        kill "${!worker_of_pid[@]}" 2>/dev/null || true
      fi
      continue
    fi
    w="${worker_of_pid[$finished]}"
    unset "worker_of_pid[$finished]"
    if $stopping; then
      note "worker $w: ended with status $status after the stop"
    elif ((status == 0)); then
      note "worker $w: the command finished"
    else
      failed+=("$w")
      first_status="$status"
      error "worker $w: the command failed with exit status $status (log: $logs_dir/worker-$w.log)"
      if ((${#worker_of_pid[@]})); then
        stopping=true
        note "stopping the job on the other workers"
        stop_everywhere || true
        start_watchdog
      fi
    fi
  done
  if [[ -n "$watchdog" ]]; then kill "$watchdog" 2>/dev/null || true; fi
  trap - INT TERM

  # Let the streamed output drain (its readers end with gcloud), but not forever.
  local i
  for ((i = 0; i < 50; i++)); do
    kill -0 "${readers[@]}" 2>/dev/null || break
    sleep 0.1
  done
  if ((${#readers[@]})); then kill "${readers[@]}" 2>/dev/null || true; fi
  rm -f "$logs_dir"/.worker-*.fifo

  if ((${#failed[@]})); then
    error "the job failed on worker(s) ${failed[*]} (exit status $first_status) and was stopped on the others; see $logs_dir/worker-${failed[0]}.log"
    exit "$first_status"
  fi
  if $interrupted; then
    error "interrupted: the job was stopped on every worker; logs: $logs_dir"
    exit 130
  fi
  note "the job finished on all $num_workers worker(s); logs: $logs_dir"
}

cmd_run() {
  if ! $has_command || ((${#command[@]} == 0)); then
    usage_error "run: no command to run: give it after --"
  fi
  resolve_job_env
  if $dry_run; then
    logs_dir="${logs_dir:-$LOGS_ROOT/$tpu-$(date +%Y%m%d-%H%M%S)}"
    quote_words gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" \
        --format='value(state,acceleratorType,networkEndpoints[].ipAddress)'
    fit_check "${accelerator:-<acceleratorType>}"
    preflight
    quote_words gcloud compute tpus tpu-vm ssh "$tpu" --worker=0 "${gcloud_flags[@]}" \
        --command="$(job_snippet)"
    echo "# ... and the same on each other worker (--worker=1, 2, ...), in the background;"
    echo "# output to $logs_dir/worker-N.log"
    return
  fi
  describe_tpu
  if [[ -n "$accelerator" && "$accelerator" != "$tpu_type" ]]; then
    error "--accelerator=$accelerator, but $tpu is a $tpu_type"
    exit 2
  fi
  note "$tpu: a $tpu_type slice, $num_workers worker(s)"
  logs_dir="${logs_dir:-$LOGS_ROOT/$tpu-$(date +%Y%m%d-%H%M%S)}"
  mkdir -p "$logs_dir"
  logs_dir="$(cd "$logs_dir" && pwd)"
  quote_words "${command[@]}" >"$logs_dir/command.txt"
  fit_check "$tpu_type"
  preflight
  start_and_wait
}

# --- logs / ssh / stop ---------------------------------------------------------------------

# The logs folder of the latest run (of $tpu when given): names end in -YYYYmmdd-HHMMSS.
latest_logs_dir() {
  local dir base best="" best_time=""
  for dir in "$LOGS_ROOT"/*/; do
    [[ -d "$dir" ]] || continue
    base="$(basename "$dir")"
    [[ "$base" =~ -([0-9]{8}-[0-9]{6})$ ]] || continue
    if [[ -n "$tpu" && "${base%-*-*}" != "$tpu" ]]; then continue; fi
    if [[ -z "$best" || "${BASH_REMATCH[1]}" > "$best_time" ]]; then
      best="${dir%/}" best_time="${BASH_REMATCH[1]}"
    fi
  done
  [[ -n "$best" ]] || return 1
  echo "$best"
}

cmd_logs() {
  local dir="$logs_dir"
  if [[ -z "$dir" ]]; then
    dir="$(latest_logs_dir)" ||
      die "no runs${tpu:+ of $tpu} under $LOGS_ROOT (give --logs-dir=DIR)"
  fi
  [[ -d "$dir" ]] || die "no logs folder $dir"
  local files=()
  if [[ -n "$worker" ]]; then
    files=("$dir/worker-$worker.log")
    [[ -e "${files[0]}" ]] || die "no log of worker $worker in $dir"
  else
    local f
    # worker-2.log before worker-10.log
    while IFS= read -r f; do files+=("$f"); done < <(
      find "$dir" -maxdepth 1 -name 'worker-*.log' | sort -V)
    ((${#files[@]})) || die "no worker logs in $dir"
  fi
  $dry_run || note "logs of $dir"
  local follow_flag=()
  if $follow; then follow_flag=(-f); fi
  run_or_print tail -n "$lines" "${follow_flag[@]}" "${files[@]}"
}

cmd_ssh() {
  if ! $has_command; then
    [[ "${worker:-0}" != all ]] || usage_error "an interactive ssh goes to one worker: --worker=N"
    run_or_print gcloud compute tpus tpu-vm ssh "$tpu" --worker="${worker:-0}" "${gcloud_flags[@]}"
    return
  fi
  ((${#command[@]})) || usage_error "ssh: no command after --"
  # As ssh does: the words make one shell command line.
  run_or_print gcloud compute tpus tpu-vm ssh "$tpu" --worker="${worker:-all}" \
      "${gcloud_flags[@]}" --command="$(ssh_snippet "${command[*]}")"
}

cmd_stop() {
  if $dry_run; then
    quote_words gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}" \
        --command="$(stop_snippet)"
    return
  fi
  note "stopping the job on every worker of $tpu (SIGKILL after ${grace}s)"
  stop_everywhere
}

main() {
  parse_args "$@"
  case "$subcommand" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    ssh) cmd_ssh ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
  esac
}

main "$@"
