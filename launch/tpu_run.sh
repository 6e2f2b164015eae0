#!/usr/bin/env bash
# Runs a command on every worker of a Cloud TPU VM (a pod slice or a single host).
#
#   launch/tpu_run.sh --tpu=NAME --zone=ZONE [--project=P] [--logs-dir=DIR] [--dry-run] \
#       -- python -m dalle_jax.tools.train --config=configs/image_tokenizer_photos.py --workdir=gs://...
#
# 1. Copies this working tree, without .venv, .git and runs, to ~/dalle_jax on every
#    worker (files deleted here are not deleted there).
# 2. On every worker: kills processes still holding the TPU (/dev/accel*) and removes
#    the stale libtpu lock file, both left behind by an earlier run, then installs the
#    package (pip install -e ".[tpu]").
# 3. Starts the command on all workers at once, in ~/dalle_jax. Each output line is
#    shown here tagged "[worker N]" and also kept, untagged, in DIR/worker-N.log
#    (default DIR: runs/tpu_logs/<tpu>-<date>-<time>).
#
# The command is passed on word by word, quoted, so arguments may hold spaces and
# quotes. --dry-run prints the commands instead of running them.
set -euo pipefail

readonly REMOTE_DIR="dalle_jax"  # under the home folder on each worker
readonly WORKER_NUMBER_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"

usage() {
  cat <<'EOF'
usage: launch/tpu_run.sh --tpu=NAME --zone=ZONE [--project=PROJECT] [--logs-dir=DIR]
                         [--dry-run] -- COMMAND [ARG...]

Copies this working tree to every worker of the Cloud TPU VM NAME, installs it,
clears stale TPU locks and runs COMMAND on all workers at once.

  --tpu=NAME        TPU VM (pod slice) name
  --zone=ZONE       its zone, e.g. us-central2-b
  --project=P       Google Cloud project (default: gcloud's configured one)
  --logs-dir=DIR    local folder for worker-N.log (default: runs/tpu_logs/NAME-TIME)
  --dry-run         print the commands instead of running them

example:
  launch/tpu_run.sh --tpu=my-v4-32 --zone=us-central2-b -- \
      python -m dalle_jax.tools.train --config=configs/image_tokenizer_photos.py --workdir=gs://bucket/run
EOF
}

usage_error() {
  echo "error: $1" >&2
  usage >&2
  exit 2
}

tpu="" zone="" project="" logs_dir="" dry_run=false
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --logs-dir=*) logs_dir="${1#*=}" ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage_error "unknown argument '$1' (the command to run goes after --)" ;;
  esac
  shift
done
[[ -n "$tpu" ]] || usage_error "--tpu=NAME is required"
[[ -n "$zone" ]] || usage_error "--zone=ZONE is required"
(($#)) || usage_error "no command to run: give it after --"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
logs_dir="${logs_dir:-$repo_root/runs/tpu_logs/$tpu-$(date +%Y%m%d-%H%M%S)}"
gcloud_flags=(--zone="$zone")
if [[ -n "$project" ]]; then
  gcloud_flags+=(--project="$project")
fi

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

run() {
  if $dry_run; then
    quote_words "$@"
  else
    "$@"
  fi
}

# Shows the tagged output and appends each worker's lines, untagged, to worker-N.log;
# lines from gcloud itself go to gcloud.log.
split_worker_logs() {
  awk -v dir="$1" '
    {
      print
      fflush()
      if (match($0, /^\[worker [^]]+\] /)) {
        file = dir "/worker-" substr($0, 9, RLENGTH - 10) ".log"
        print substr($0, RLENGTH + 1) >> file
      } else {
        file = dir "/gcloud.log"
        print >> file
      }
      fflush(file)
    }'
}

# --- 1. copy the working tree -------------------------------------------------------
# scp cannot exclude paths, so the tree is staged first.
if $dry_run; then
  staging_dir="$(mktemp -d -u)"
  echo "# stage $repo_root without .venv .git runs in $staging_dir/$REMOTE_DIR"
else
  staging_dir="$(mktemp -d)"
  trap 'rm -rf "$staging_dir"' EXIT
  mkdir "$staging_dir/$REMOTE_DIR"
  tar -C "$repo_root" --exclude=./.venv --exclude=./.git --exclude=./runs \
      --exclude=__pycache__ --exclude='*.egg-info' -cf - . \
    | tar -C "$staging_dir/$REMOTE_DIR" -xf -
fi
run gcloud compute tpus tpu-vm scp --recurse "$staging_dir/$REMOTE_DIR" "$tpu:~/" \
    --worker=all "${gcloud_flags[@]}"

# --- 2. clear stale TPU locks and install -------------------------------------------
# TPU chips are /dev/accel* on v2-v4 and /dev/vfio/* on newer generations.
setup_command="(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo kill -9 || true)"
setup_command+=" && sudo rm -f /tmp/libtpu_lockfile"
setup_command+=" && cd ~/$REMOTE_DIR && python3 -m pip install --quiet -e '.[tpu]'"
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}" \
    --command="$setup_command"

# --- 3. run on all workers ----------------------------------------------------------
user_command="$(quote_words "$@")"
# pipefail: the command's exit status, not sed's, is the worker's.
worker_number="curl -sf --max-time 5 -H 'Metadata-Flavor: Google' $WORKER_NUMBER_URL || hostname"
run_command="set -o pipefail; export PYTHONUNBUFFERED=1; worker=\$($worker_number)"
run_command+="; cd ~/$REMOTE_DIR && { $user_command; } 2>&1 | sed -u \"s/^/[worker \$worker] /\""
run_step=(gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${gcloud_flags[@]}"
          --command="$run_command")
if $dry_run; then
  quote_words "${run_step[@]}"
  exit 0
fi
mkdir -p "$logs_dir"
status=0
"${run_step[@]}" 2>&1 | split_worker_logs "$logs_dir" || status=$?
echo "worker logs: $logs_dir" >&2
exit "$status"
