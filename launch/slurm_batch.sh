#!/usr/bin/env bash
# The batch script behind launch/slurm_run.sh: runs COMMAND as one srun step over the whole
# allocation, one task per GPU (default) or one per node, each task's output in its own log.
# Submitted by slurm_run.sh; by hand it is:
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --output=runs/slurm_logs/%x-%j.log \
#       launch/slurm_batch.sh [--per=gpu|node] [--gpus-per-node=G] [--logs-dir=DIR] \
#       -- COMMAND [ARG...]
#
# Devices. Every task sees all the GPUs of its node (no per-task binding), and jax picks:
# dalle_jax/train/distributed.py starts jax.distributed when SLURM_NTASKS > 1, whose SLURM
# detection gives task i of a node that node's GPU i (SLURM_LOCALID) -- one process per
# GPU. With --per=node the one task of a node must take all of them, which
# JAX_LOCAL_DEVICE_IDS=0,...,G-1 asks for instead.
#
# Exit status: srun's. --kill-on-bad-exit=1 ends every task as soon as one fails, and srun
# then exits non-zero, which fails the job.
set -euo pipefail

error() { echo "error: $*" >&2; }

per=gpu gpus="" logs_dir="runs/slurm_logs"
while (($#)); do
  case "$1" in
    --per=*) per="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --logs-dir=*) logs_dir="${1#*=}" ;;
    --) shift; break ;;
    *) error "unknown argument '$1' (the command goes after --)"; exit 2 ;;
  esac
  shift
done
if ((!$#)); then error "no command: give it after --"; exit 2; fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  error "this is a batch script: submit it with sbatch, or use launch/slurm_run.sh"
  exit 2
fi
[[ "$per" == gpu || "$per" == node ]] || { error "--per takes gpu or node, not '$per'"; exit 2; }
# sbatch --gpus-per-node=8 (or =a100:8) sets SLURM_GPUS_PER_NODE.
gpus="${gpus:-${SLURM_GPUS_PER_NODE:-}}"
gpus="${gpus##*:}"
if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
  error "cannot tell the GPUs per node (got '$gpus'): submit with --gpus-per-node=G"
  exit 2
fi

nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
if [[ "$per" == gpu ]]; then
  tasks_per_node="$gpus"
  unset JAX_LOCAL_DEVICE_IDS  # jax's default: task i of a node uses GPU i
else
  tasks_per_node=1
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
export PYTHONUNBUFFERED=1  # task logs as they happen
mkdir -p "$logs_dir"
task_logs="$logs_dir/${SLURM_JOB_NAME:-job}-%j-%t.log"  # %j: job id, %t: task number

echo "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}): $nodes node(s) ${SLURM_JOB_NODELIST:-}," \
     "$tasks_per_node task(s) per node (one per $per), $gpus GPU(s) per node"
echo "command: $(printf '%q ' "$@")"
echo "task logs: $task_logs"

status=0
srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$((nodes * tasks_per_node))" \
    --ntasks-per-node="$tasks_per_node" --output="$task_logs" "$@" || status=$?
if ((status != 0)); then
  error "a task failed (srun's exit status $status); srun ended the others. Task logs: $task_logs"
fi
exit "$status"
