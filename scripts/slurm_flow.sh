#!/usr/bin/env bash
# Optical flow for a whole prepared dataset as a SLURM job array: one goca-flow shard per array task, then one merge.
#
#   jid=$(sbatch --parsable --array=0-63 scripts/slurm_flow.sh /data/k400 --backend torch --device cuda)
#   sbatch --dependency=afterany:$jid scripts/slurm_flow.sh /data/k400 --merge
#
# Task i runs `goca-flow --shard i/N`: every N-th video from the i-th, N = SHARDS or the array's task count. A shard
# journals each flow video it finishes (flow_journal/ under the dataset root), so a task that is pre-empted, requeued
# (--requeue) or resubmitted computes only what is missing, and its restart reads no video it has already done. To
# rerun one failed shard, keep N fixed: `SHARDS=64 sbatch --array=17 scripts/slurm_flow.sh /data/k400 ...`.
# The shards never write index.jsonl; the merge job does, once, from the journals: one stat per video (a probe only
# for a flow file no journal vouches for), so its cost is linear in the dataset. `afterany` runs it even when a shard
# failed: its report counts what is missing (excluded.jsonl, "flow missing"), and rerunning the missing shards and
# then the merge completes the index.
# --workers defaults to the task's CPUs (SLURM_CPUS_PER_TASK); arguments after the root go to goca-flow and win.
#SBATCH --job-name=goca-flow
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --requeue
#SBATCH --output=slurm-flow-%A_%a.out
set -euo pipefail
ROOT=${1:?usage: sbatch --array=0-N scripts/slurm_flow.sh DATASET_ROOT [goca-flow arguments] | ... DATASET_ROOT --merge}
shift
PYTHON=${PYTHON:-python}
for arg in "$@"; do
  if [[ $arg == --merge ]]; then
    exec "$PYTHON" -m goca_fast.cli.flow --root "$ROOT" --no-progress "$@"
  fi
done
TASK=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=0-N (or pass --merge for the merge job)}
SHARDS=${SHARDS:-${SLURM_ARRAY_TASK_COUNT:?set SHARDS (the array has no task count)}}
if (( TASK < 0 || TASK >= SHARDS )); then
  echo "slurm_flow.sh: array task $TASK is not a shard of $SHARDS (use --array=0-$((SHARDS - 1)))" >&2
  exit 2
fi
exec "$PYTHON" -m goca_fast.cli.flow --root "$ROOT" --shard "$TASK/$SHARDS" --workers "${SLURM_CPUS_PER_TASK:-1}" \
  --no-progress "$@"
