#!/bin/bash
# Plain torchrun on every node (no accelerate config file): the trainer's Accelerator reads the
# torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR). Run on each node with its
# NODE_RANK; MAIN_IP is node 0's address. torchrun restarts failed workers (--max_restarts); every
# start after the first checkpoint resumes from the newest one.
#   NNODES=2 NODE_RANK=0 MAIN_IP=10.0.0.1 bash docs/accelerate/torchrun_train.sh configs/train/YOUR.yaml
set -euo pipefail
TRAIN_CONFIG=${1:?usage: torchrun_train.sh TRAIN_CONFIG}
cat > /tmp/t2i_recap_resume.sh <<INNER
#!/bin/bash
RUN_DIR=\$(python -c "from t2i_recap.config import load_config; from t2i_recap.train_config import TrainConfig; print(load_config(TrainConfig, '$TRAIN_CONFIG').trainer.run_dir)")
if ls "\$RUN_DIR"/checkpoints/step-* >/dev/null 2>&1; then exec python -m t2i_recap.train --config $TRAIN_CONFIG --resume latest; fi
exec python -m t2i_recap.train --config $TRAIN_CONFIG
INNER
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "${MAIN_IP:-127.0.0.1}:29500" --max_restarts 3 \
  --no-python bash /tmp/t2i_recap_resume.sh
