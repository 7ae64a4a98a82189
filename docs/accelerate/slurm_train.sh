#!/bin/bash
# SLURM: one task per node; each task runs `accelerate launch` for its node's 8 GPUs.
#   sbatch --nodes 4 docs/accelerate/slurm_train.sh configs/train/YOUR.yaml [docs/accelerate/fsdp_dit_xl.yaml]
#SBATCH --job-name=t2i-recap
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
TRAIN_CONFIG=${1:?usage: sbatch slurm_train.sh TRAIN_CONFIG [ACCELERATE_CONFIG]}
ACCEL_CONFIG=${2:-docs/accelerate/multi_node_ddp.yaml}
GPUS_PER_NODE=8
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export HF_HUB_OFFLINE=1  # models are pre-downloaded on shared storage; no node talks to the hub
# --resume latest is safe on the first run too only after one checkpoint exists: detect it.
RUN_DIR=$(python -c "from t2i_recap.config import load_config; from t2i_recap.train_config import TrainConfig; print(load_config(TrainConfig, '$TRAIN_CONFIG').trainer.run_dir)")
RESUME=()
if ls "$RUN_DIR"/checkpoints/step-* >/dev/null 2>&1; then RESUME=(--resume latest); fi
# A preempted/requeued job (SIGUSR1 five minutes before the limit) restarts from the newest checkpoint.
trap 'scontrol requeue "$SLURM_JOB_ID"' USR1
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $ACCEL_CONFIG \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port 29500 \
  -m t2i_recap.train --config $TRAIN_CONFIG ${RESUME[*]}" &
wait
