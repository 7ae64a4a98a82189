#!/usr/bin/env bash
# The DiT trainer under accelerate's FSDP2 on one NVIDIA GPU, through the documented
# launcher config: train with checkpoints and validation, `--resume latest`, the same run straight
# through (weights must agree), a one-process resume of the FSDP checkpoint, `export`.
#
#   bash benchmarks/gpu_fsdp_check.sh [ASSETS DATA]     # from anywhere; ~2 min on a GPU (estimate)
#
# ASSETS holds clip/ and vae/ (`t2i-recap shapes assets --out ASSETS`); DATA holds shapes shards at
# 32 px made with `--curated-fraction 1` (every sample has a gold caption). Without them both are
# built in the work folder: `shapes make` (256 samples) and `shapes assets` (a copy of the parts the
# package ships prebuilt; without them, or if that takes over 60 s, random tiny encoders from
# tests/fixtures_train.py: FSDP's correctness does not depend on what the encoders learned).
# Prints one PASS/FAIL line per check; exits 1 if any failed. Everything, commands' output included,
# goes to FSDP_CHECK_OUT/fsdp_check.log (default: a new temp folder; the work folder is FSDP_CHECK_WORK).
# FSDP_CHECK_CPU=1 runs the same steps on CPU processes (FSDP_CHECK_PROCESSES, default 1) through
# tests/fsdp_cpu_harness.py, which lifts accelerate's GPU-only FSDP gate: how this script is tested
# on a machine without a GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
OUTDIR="${FSDP_CHECK_OUT:-$(mktemp -d /tmp/fsdp-check-out.XXXXXX)}"
WORK="${FSDP_CHECK_WORK:-$(mktemp -d /tmp/fsdp-check.XXXXXX)}"
mkdir -p "$OUTDIR" "$WORK"
LOG="$OUTDIR/fsdp_check.log"
NPROC="${FSDP_CHECK_PROCESSES:-1}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${FSDP_CHECK_CPU:-0}" = 1 ]; then
  MP=no ENTRY=(tests/fsdp_cpu_harness.py --report "$WORK/report.json")
  export OMP_NUM_THREADS=1
else
  MP=bf16 ENTRY=(-m t2i_recap.train)
fi
FAILED=0
START=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }
# check NAME CMD...: PASS when CMD succeeds (its output goes to the log).
check() {
  local name="$1"
  shift
  if "$@" >>"$LOG" 2>&1; then say "PASS $name"; else say "FAIL $name"; FAILED=1; fi
}
# step NAME CMD...: a command of the check, timed, its output in the log.
step() {
  local name="$1" t0 rc
  shift
  t0=$(date +%s)
  echo "== $name: $*" >>"$LOG"
  "$@" >>"$LOG" 2>&1
  rc=$?
  if [ $rc = 0 ]; then
    say "PASS $name ($(($(date +%s) - t0)) s)"
  else
    say "FAIL $name (exit $rc, see $LOG)"
    FAILED=1
  fi
  return $rc
}

# config FILE RUN_DIR MAX_STEPS: a tiny run (DiT-tiny/2, global batch 32 = micro 16 x NPROC x accumulation).
config() {
  cat >"$1" <<EOF
data: {shards: "$DATA", resolution: 32, shuffle_buffer: 64, original_caption: txt, recaption: "json:gold_caption"}
mixing: {p: 0.3, cfg_dropout: 0.1}
text_encoder: {name_or_path: "$ASSETS/clip"}
features: {vae: "$ASSETS/vae", dtype: float32}
model: {name: DiT-tiny/2}
objective: {name: rectified_flow}
optim: {lr: 1.0e-3}
ema: {decay: 0.99}
trainer: {run_dir: "$2", max_steps: $3, batch_size: 32, micro_batch_size: 16, mixed_precision: "$MP", log_every: 10}
checkpoint: {every_steps: 20, keep: 5}
validation: {every_steps: 20, prompts: [a red circle, two blue squares], seeds: [0, 1], num_inference_steps: 8}
EOF
}

# fsdp CONFIG [ARGS...]: the trainer in NPROC processes under the documented FSDP2 launcher config.
fsdp() {
  local port
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$PY" -m accelerate.commands.launch --config_file docs/accelerate/fsdp_dit_xl.yaml --num_machines 1 \
    --num_processes "$NPROC" --machine_rank 0 --main_process_ip 127.0.0.1 --main_process_port "$port" \
    --mixed_precision "$MP" "${ENTRY[@]}" --config "$@"
}

world() {
  "$PY" -m t2i_recap shapes make --out "$DATA" --num 256 --resolution 32 --curated-fraction 1 --shard-size 64 \
    --no-progress || return 1
  if [ -f t2i_recap/shapes/prebuilt/assets.json ]; then
    timeout 60 "$PY" -m t2i_recap shapes assets --out "$ASSETS" && return 0
  fi
  echo "no prebuilt shapes assets (or not reusable within 60 s): random tiny encoders instead"
  "$PY" - "$ASSETS" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from fixtures_train import build_tiny_encoders  # noqa: E402  (16 px VAE config; it runs at any size)

from t2i_recap.shapes.tokenizer import build_tokenizer  # noqa: E402

out = Path(sys.argv[1])
build_tokenizer(out / "tokenizer")
build_tiny_encoders(out, out / "tokenizer")
EOF
}

# same A B STEP: model, EMA and optimizer of two runs' checkpoints at STEP agree.
same() {
  "$PY" - "$1" "$2" "$3" <<'EOF'
import sys
from safetensors.torch import load_file

a, b, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
worst = {}
for name in ("model", "ema", "optimizer"):
    x, y = (load_file(f"{run}/checkpoints/step-{step:08d}/{name}.safetensors") for run in (a, b))
    assert x.keys() == y.keys(), name
    worst[name] = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
print("max abs difference, resumed vs straight:", worst)
sys.exit(0 if max(worst.values()) <= 1e-4 else 1)
EOF
}

generate() {
  "$PY" - "$1" <<'EOF'
import sys

import numpy as np
import torch

from t2i_recap.generation import generate_from_settings, load_pipeline

device = "cuda" if torch.cuda.is_available() else "cpu"
pipe, settings = load_pipeline(sys.argv[1], device=device)
images = generate_from_settings(pipe, settings, ["a red circle", "two blue squares"], [0, 1])
arrays = [np.asarray(im, dtype=float) for im in images]
print(device, [im.size for im in images], [round(float(a.std()), 2) for a in arrays])
sys.exit(0 if all(a.std() > 0 for a in arrays) and not np.array_equal(arrays[0], arrays[1]) else 1)
EOF
}

if [ $# -ge 2 ]; then ASSETS="$1" DATA="$2"; else ASSETS="$WORK/assets" DATA="$WORK/data"; fi
say "gpu_fsdp_check: work $WORK, log $LOG, $NPROC process(es), mixed precision $MP, $(date -u +%FT%TZ)"
"$PY" -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__,
  "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"
if [ $# -lt 2 ]; then step "shapes world (data + assets)" world || exit 1; fi
R="$WORK/resumed" S="$WORK/straight"
config "$WORK/a.yaml" "$R" 40
config "$WORK/b.yaml" "$R" 50
config "$WORK/s.yaml" "$S" 50
config "$WORK/d.yaml" "$R" 55

if step "FSDP train to step 40 (checkpoints and validation every 20)" fsdp "$WORK/a.yaml"; then
  check "the parameters were DTensor shards" grep -q "FSDP2: the model's parameters are DTensor shards" "$LOG"
  check "checkpoints 20 and 40 and their validation grids" test -f "$R/checkpoints/step-00000040/ema.safetensors" \
    -a -f "$R/checkpoints/step-00000020/state.json" -a -f "$R/samples/step-00000020.png" \
    -a -f "$R/samples/step-00000040.png"
fi
step "FSDP --resume latest to step 50" fsdp "$WORK/b.yaml" --resume latest
step "FSDP straight to step 50 (validation at 20 and 40, then training on)" fsdp "$WORK/s.yaml"
check "resumed == straight at step 50 (model, EMA, optimizer; max abs diff <= 1e-4)" same "$R" "$S" 50
step "one process (no FSDP) resumes the FSDP checkpoint to step 55" \
  "$PY" -m t2i_recap train --config "$WORK/d.yaml" --resume latest
check "checkpoint 55 written by one process" test -f "$R/checkpoints/step-00000055/model.safetensors"
if step "export the run" "$PY" -m t2i_recap export --run "$R" --out "$WORK/export"; then
  check "the export loads and generates distinct, non-blank images" generate "$WORK/export"
fi
say "gpu_fsdp_check: $([ $FAILED = 0 ] && echo PASS || echo FAIL) in $(($(date +%s) - START)) s"
exit $FAILED
