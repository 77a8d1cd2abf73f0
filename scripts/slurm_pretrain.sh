#!/usr/bin/env bash
# Multi-node GOCA pretraining under SLURM: one torchrun per node, one process per GPU.
#
#   sbatch --nodes=8 --gres=gpu:8 scripts/slurm_pretrain.sh configs/k400_r2plus1d.yaml [key=value ...]
#
# Rendezvous: c10d at the job's first host (scontrol show hostnames), port MASTER_PORT or 20000 + job id % 10000 (two
# jobs sharing a first host do not collide); the rendezvous id is the job id.
#
# Pre-emption: --signal=USR1@120 makes SLURM send SIGUSR1 to every process of the job step (torchrun and its
# workers) two minutes before the time limit; pre-emption sends SIGTERM. torchrun is told to handle and forward
# SIGUSR1 (--signals-to-handle; otherwise SIGUSR1's default action kills torchrun and strands its workers) and to
# give its workers SHUTDOWN_TIMEOUT (default 100) s to checkpoint before it kills them. Every trainer stops at the
# same batch boundary (the stop flag is all-reduced), rank 0 writes one checkpoint, and every trainer exits 0 once it
# is on disk; a torchrun that received the signal itself then exits 1 (torchrun's own answer to a death signal).
# With --requeue SLURM requeues a pre-empted job, which resumes from the run directory.
#
# Crashes: --max-restarts=MAX_RESTARTS (default 3) restarts every worker of the job after one fails; the restarted
# trainers resume from the run directory's latest checkpoint (even under --fresh). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# keeps torchrun's rendezvous store out of the workers' process-group set-up: a restarted worker can otherwise read
# the previous attempt's addresses from it and fail to connect (pytorch/pytorch#135712; with gloo on torch 2.14, 3
# of 4 restarts failed so).
#
# Hangs: a rank that stops answering ends the job after engine.dist_timeout_s (default 300 s): NCCL's watchdog
# aborts the communicator and ends each waiting process (TORCH_NCCL_ASYNC_ERROR_HANDLING=1); torchrun then restarts
# the workers from the last checkpoint (at most MAX_RESTARTS times), and srun --kill-on-bad-exit=1 ends the other
# nodes once one torchrun gives up.
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
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --max-restarts="$MAX_RESTARTS" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
  -m goca_fast.cli.pretrain --config "$CONFIG" "$@"
