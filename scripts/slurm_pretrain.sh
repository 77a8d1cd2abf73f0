#!/usr/bin/env bash
# Multi-node GOCA pretraining under SLURM: one torchrun per node, one process per GPU.
#
#   sbatch --nodes=8 --gres=gpu:8 scripts/slurm_pretrain.sh configs/k400_r2plus1d.yaml [key=value ...]
#
# Pre-emption: SLURM sends SIGTERM (or SIGUSR1 with --signal=USR1@120) before killing the job; every rank then
# writes a checkpoint at the next batch boundary and exits 0. With --requeue the job restarts and resumes from the
# run directory automatically.
#SBATCH --job-name=goca
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_pretrain.sh CONFIG.yaml [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))}
# srun forwards the signal to torchrun, which forwards it to its workers
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m goca_fast.pretrain --config "$CONFIG" "$@"
