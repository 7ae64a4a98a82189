#!/bin/bash
# SLURM: one task per node; each task runs `accelerate launch` for its node's 8 GPUs.
#   sbatch --nodes 4 docs/accelerate/slurm_train.sh configs/train/YOUR.yaml [docs/accelerate/fsdp_dit_xl.yaml]
#
# Preemption: SLURM sends SIGTERM (here also at --signal time, 300 s before the limit). Every training
# process then finishes its current optimizer step, all agree on that step, save one checkpoint of it
# and exit with status 75 (EX_TEMPFAIL). The job requeues itself on 75 and `--resume auto` continues
# from the newest checkpoint (or starts fresh when there is none), so this script needs no other logic.
# A resume whose config changed in keys that break exact resumption (model, objective, batch sizes,
# data, mixing, ...) is refused (status 2) naming the keys; see `t2i-recap train --help`
# (--resume-allow-changes).
#SBATCH --job-name=t2i-recap
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --output=logs/%x-%j.out
set -uo pipefail
TRAIN_CONFIG=${1:?usage: sbatch slurm_train.sh TRAIN_CONFIG [ACCELERATE_CONFIG]}
ACCEL_CONFIG=${2:-docs/accelerate/multi_node_ddp.yaml}
GPUS_PER_NODE=8
PREEMPTED=75  # t2i_recap.trainer.PREEMPTED_EXIT_CODE
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export HF_HUB_OFFLINE=1  # models are pre-downloaded on shared storage; no node talks to the hub
# The batch shell passes SIGTERM on to srun, which signals every task's launcher and so every rank.
# A launcher (torchrun under accelerate) reports a worker's 75 as its own failure (status 1), so the
# signal itself also marks the job for requeue.
SIGNALLED=0
trap 'SIGNALLED=1; kill -TERM "$TRAIN_PID" 2>/dev/null' TERM
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $ACCEL_CONFIG \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port 29500 \
  -m t2i_recap.train --config $TRAIN_CONFIG --resume auto" &
TRAIN_PID=$!
wait "$TRAIN_PID"; status=$?
if [ "$SIGNALLED" -eq 1 ]; then wait "$TRAIN_PID"; status=$?; fi  # the trap interrupted the first wait
if [ "$status" -eq "$PREEMPTED" ] || [ "$SIGNALLED" -eq 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit "$status"
