#!/usr/bin/env bash
# Submits a dalle_jax job to a SLURM GPU cluster: NODES nodes with GPUS GPUs each, one
# process per GPU (default) or per node, started by srun from launch/slurm_batch.sh in
# this working tree (which the nodes must see: a shared filesystem), each task's output in
# its own log. `launch/slurm_run.sh -h` lists the flags.
#
# The command goes to sbatch as the batch script's arguments, and from there to srun, word
# by word, so arguments may hold spaces and quotes. --env values go through the
# environment (sbatch --export=ALL), never through a comma-separated --export list.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
usage: launch/slurm_run.sh --nodes=N --gpus-per-node=G [--per=gpu|node] [--partition=P]
                           [--time=T] [--account=A] [--job-name=NAME] [--logs-dir=DIR]
                           [--env=KEY[=VALUE]]... [--sbatch-option=OPT]... [--wait]
                           [--dry-run] -- COMMAND [ARG...]

Submits COMMAND with sbatch; srun starts it on every node, in this working tree.

  --nodes=N            nodes (required)
  --gpus-per-node=G    GPUs per node (required)
  --per=gpu|node       one process per GPU (default: G tasks per node, jax gives each its
                       GPU) or one per node (1 task per node, all G GPUs)
  --partition=P        SLURM partition
  --time=T             time limit, e.g. 04:00:00
  --account=A          account to charge
  --job-name=NAME      job name (default dalle_jax; letters, digits, . _ -)
  --logs-dir=DIR       logs: DIR/NAME-JOBID.log (the batch script) and
                       DIR/NAME-JOBID-TASK.log (each task); default runs/slurm_logs
  --env=KEY=VALUE      set KEY for the job (repeatable)
  --env=KEY            pass KEY's value from this shell (an error if unset)
  --sbatch-option=OPT  any other sbatch option, e.g. --sbatch-option=--qos=high
  --wait               wait for the job to end and exit with its status (sbatch --wait)
  --dry-run            print the sbatch command instead of running it
  -h, --help           this help

A task that fails ends the others (srun --kill-on-bad-exit=1) and fails the job.

example:
  launch/slurm_run.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=04:00:00 -- \
      python -m dalle_jax.tools.train --config=configs/image_tokenizer_shapes.py \
      --workdir=runs/dvae_shapes_slurm
EOF
}

usage_error() {
  echo "error: $1" >&2
  usage >&2
  exit 2
}

# The arguments as one line of shell words (as launch/tpu_run.sh prints them).
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

nodes="" gpus="" per=gpu partition="" time_limit="" account="" job_name=dalle_jax
logs_dir="" wait_for_job=false dry_run=false job_env=() sbatch_options=() command=()
while (($#)); do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --logs-dir=*) logs_dir="${1#*=}" ;;
    --env=*) job_env+=("${1#*=}") ;;
    --sbatch-option=*) sbatch_options+=("${1#*=}") ;;
    --wait) wait_for_job=true ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    --) shift; command=("$@"); break ;;
    *) usage_error "unknown argument '$1' (the command to run goes after --)" ;;
  esac
  shift
done

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes=N is required (a positive number)"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus-per-node=G is required (a positive number)"
[[ "$per" == gpu || "$per" == node ]] || usage_error "--per takes gpu or node, not '$per'"
# The name goes into srun's --output pattern, where % is special.
[[ "$job_name" =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--job-name takes letters, digits, . _ -, not '$job_name'"
((${#command[@]})) || usage_error "no command to run: give it after --"
for option in "${sbatch_options[@]}"; do
  [[ "$option" == -* ]] || usage_error "--sbatch-option takes an sbatch option, such as --qos=high, not '$option'"
done

# --env: KEY=VALUE pairs for `env`, which sbatch (--export=ALL) hands to the job and srun
# to every task.
env_pairs=()
for entry in "${job_env[@]}"; do
  key="${entry%%=*}"
  [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage_error "--env=$entry: '$key' is not a variable name"
  if [[ "$entry" == *=* ]]; then
    env_pairs+=("$entry")
  else
    [[ -n "${!key+set}" ]] || usage_error "--env=$key: $key is not set here"
    env_pairs+=("$key=${!key}")
  fi
done

logs_dir="${logs_dir:-$REPO_ROOT/runs/slurm_logs}"
if ! $dry_run; then
  mkdir -p "$logs_dir"  # sbatch does not create it, and would lose the output
  logs_dir="$(cd "$logs_dir" && pwd)"
fi

tasks_per_node="$gpus"
if [[ "$per" == node ]]; then
  tasks_per_node=1
fi
sbatch_args=(--job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
             --gpus-per-node="$gpus" --chdir="$REPO_ROOT" --export=ALL
             --output="$logs_dir/$job_name-%j.log")
if [[ -n "$partition" ]]; then sbatch_args+=(--partition="$partition"); fi
if [[ -n "$time_limit" ]]; then sbatch_args+=(--time="$time_limit"); fi
if [[ -n "$account" ]]; then sbatch_args+=(--account="$account"); fi
if $wait_for_job; then sbatch_args+=(--wait); fi
sbatch_args+=("${sbatch_options[@]}")

submit=(sbatch "${sbatch_args[@]}" "$REPO_ROOT/launch/slurm_batch.sh" --per="$per"
        --gpus-per-node="$gpus" --logs-dir="$logs_dir" -- "${command[@]}")
if ((${#env_pairs[@]})); then
  submit=(env "${env_pairs[@]}" "${submit[@]}")
fi

if $dry_run; then
  quote_words "${submit[@]}"
  exit 0
fi
echo "slurm_run: $nodes node(s) x $tasks_per_node task(s) ($gpus GPU(s) per node, one task per $per);" \
     "logs: $logs_dir/$job_name-JOBID.log, task logs $logs_dir/$job_name-JOBID-TASK.log" >&2
status=0
"${submit[@]}" || status=$?
if ((status != 0)); then
  if $wait_for_job; then
    echo "error: the job failed (exit status $status); see $logs_dir/$job_name-JOBID*.log" >&2
  else
    echo "error: sbatch failed (exit status $status)" >&2
  fi
fi
exit "$status"
