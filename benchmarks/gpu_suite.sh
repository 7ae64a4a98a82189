#!/usr/bin/env bash
# Run the GPU benchmarks on one card and collect their tables in one output folder.
#
#   bash benchmarks/gpu_suite.sh --fetch-wheels                  # on a machine with PyPI: wheels -> .whl/
#   bash benchmarks/gpu_suite.sh [--out DIR] [--time-limit S] [--dry-run] PART...   # on the GPU machine
#
# The GPU machine may be offline: --fetch-wheels downloads the few wheels a stock CUDA PyTorch image
# lacks into .whl/, and the run installs them and this project into a private --target folder.
# PARTs (each under its own timeout, so one hang or OOM never costs the others' results):
#   env        card, driver, versions                                           (~0.5 min)
#   smoke      every script at its tiny size on the GPU: catches breakage fast  (~2 min)
#   train-b4   train_step.py: DiT-B/4,  CLIP-L and T5-XXL text, 3 rows each     (~4 min)
#   train-b2   train_step.py: DiT-B/2,  CLIP-L text                              (~3 min)
#   train-xl2  train_step.py: DiT-XL/2, CLIP-L and T5-XXL text                   (~6 min)
#   train-pad  train_step.py: DiT-B/4, T5-XXL with ~64-token padded captions    (~2 min)
#   e2e        trainer_e2e.py: DiT-B/4 trainer, batch in memory / 0 / 8 workers  (~4 min)
#   caption    caption_throughput.py: 8B LLaVA shape, batches 32 64 128          (~5 min)
#   data       data_cpu.py: shard decode and cache read on this machine's CPUs (~2 min)
#   b4-clip    train_step.py: DiT-B/4, CLIP-L text only, 3 rows
#   xl2-clip   train_step.py: DiT-XL/2, CLIP-L text only, 3 rows
#   caption-2  caption_throughput.py: 8B LLaVA shape, batches 64 128, 2 timed batches each
#   fsdp       gpu_fsdp_check.sh: the trainer under accelerate's FSDP2 on this GPU (1 process)  (~2 min)
#   caption-sweep  captioner_sweep.py: the tiny shapes captioner, 6 decoder variants at once on
#              the GPU, caption fidelity of each; sweep.md + best_captioner.tar       (~6 min)
#   all        every part above, in that order
# Minutes are estimates, not measurements.
# BENCH_DEVICE=cpu runs the parts on the CPU instead (no GPU needed; `smoke` is the end-to-end check
# of the suite itself, at tiny sizes: BENCH_DEVICE=cpu bash benchmarks/gpu_suite.sh --out DIR env smoke).
# Output in --out DIR (default ./bench-out): tables.md (every table with its command and
# environment), results.jsonl (one JSON line per row), run.log (all output), env.txt.
# --time-limit S (default 570) bounds the whole run: each part's timeout is cut to what is left, and
# a part with under a minute left is skipped, so a run under an outer wall-clock limit still ends
# with complete tables.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUTDIR="$ROOT/bench-out"
PY="${PYTHON:-python3}"
SITE="${BENCH_SITE:-/tmp/bench-site}"
DRY=0
LIMIT=570
START=$(date +%s)
# Wheels a stock CUDA PyTorch image lacks: diffusers and importlib_metadata for it (held below 9,
# whose new dependency such images also lack); transformers 5.24.0 so the GPU runs the version the
# project is tested with (its other needs come with the image).
WHEELS=("diffusers==0.42.1" "importlib_metadata==8.7.0" "transformers==5.24.0" "braceexpand==0.1.7" "webdataset==1.0.2")

fetch_wheels() {
  local exclude
  exclude="$(git rev-parse --git-path info/exclude)"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  mkdir -p .whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -la .whl
}

# run NAME SECONDS CMD...: one benchmark under a timeout, output appended to run.log.
run() {
  local name="$1" secs="$2" left
  shift 2
  left=$((LIMIT - ($(date +%s) - START) - 15))
  if [ "$left" -lt "$secs" ]; then secs=$left; fi
  if [ "$secs" -lt 60 ]; then
    echo "== $name: skipped, ${left}s left of the ${LIMIT}s time limit"
    if [ "$DRY" = 0 ]; then
      echo "== $name: skipped (time limit)" >>"$OUTDIR/run.log"
      echo "- $name: not run (the run's --time-limit was spent)" >>"$OUTDIR/tables.md"
    fi
    return 0
  fi
  echo "== $name (timeout ${secs}s): $*"
  if [ "$DRY" = 1 ]; then
    return 0
  fi
  local start rc
  start=$(date +%s)
  timeout --signal=INT --kill-after=30 "$secs" "$@" 2>&1 | tee -a "$OUTDIR/run.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUTDIR/run.log"
  if [ "$rc" = 124 ]; then
    echo "- $name stopped by its ${secs}s timeout; rows above it are complete." >>"$OUTDIR/tables.md"
  fi
  return 0
}

setup() {
  if [ "$DRY" = 1 ]; then
    echo "== setup: install .whl/*.whl and this project into $SITE (offline)"
    return 0
  fi
  mkdir -p "$OUTDIR" "$SITE"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "wheel install failed" >&2; exit 1; }
  fi
  # The project itself: captioner/ and evaluate/ install as t2i_recap.* (package-dir mapping), so a
  # plain PYTHONPATH=. is not enough; the build needs only setuptools, already in the image.
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . \
    || { echo "project install failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # Child processes too (`python -m t2i_recap ...`, accelerate's workers): the checkout's t2i_recap/
  # (no captioner/ inside) must never shadow the installed package. The benchmark scripts add their
  # own folder to sys.path themselves.
  export PYTHONSAFEPATH=1
  if ! "$PY" -P -c "import transformers" >/dev/null 2>&1; then
    # e.g. a dependency of the carried version is older in the image: use the image's own transformers
    echo "the wheel-installed transformers does not import here; falling back to the image's version" | tee -a "$OUTDIR/run.log"
    rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
  fi
  # -P: the checkout's own t2i_recap/ folder (no captioner/ inside) must not shadow the installed package
  "$PY" -P -c "import diffusers, transformers, torch, t2i_recap.captioner.backend; print('imports ok:', \
'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUTDIR/run.log" \
    || { echo "imports failed: see above" >&2; exit 1; }
}

part_env() {
  if [ "$DRY" = 1 ]; then echo "== env: nvidia-smi, versions -> $OUTDIR/env.txt"; return 0; fi
  {
    date -u
    nvidia-smi || true
    "$PY" -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, \
'| accelerate', accelerate.__version__); print(torch.cuda.get_device_properties(0) if torch.cuda.is_available() else 'no CUDA device visible to torch')"
    nproc
  } >"$OUTDIR/env.txt" 2>&1
  cat "$OUTDIR/env.txt"
}

DEVICE="${BENCH_DEVICE:-cuda}"
common_args() { echo --device "$DEVICE" --markdown "$OUTDIR/tables.md" --json "$OUTDIR/results.jsonl"; }

part() {
  local t="benchmarks/train_step.py"
  # shellcheck disable=SC2046  # common_args is a word list on purpose
  case "$1" in
    env) part_env ;;
    smoke)
      run smoke-train 200 "$PY" "$t" --sizes tiny --steps 2 --keep-going $(common_args)
      run smoke-caption 120 "$PY" benchmarks/caption_throughput.py --shape tiny --new-tokens 16 --keep-going \
        $(common_args)
      run smoke-e2e 150 "$PY" benchmarks/trainer_e2e.py --size tiny --steps 3 --loaders mem 0 --keep-going \
        $(common_args) ;;
    train-b4) run train-b4 480 "$PY" "$t" --sizes paper --models DiT-B/4 --keep-going $(common_args) ;;
    train-b2) run train-b2 420 "$PY" "$t" --sizes paper --models DiT-B/2 --texts clip-l --keep-going $(common_args) ;;
    train-xl2) run train-xl2 540 "$PY" "$t" --sizes paper --models DiT-XL/2 --keep-going $(common_args) ;;
    train-pad) run train-pad 240 "$PY" "$t" --sizes paper --models DiT-B/4 --texts t5-xxl --caption-tokens 64 \
      --variants baseline project --keep-going $(common_args) ;;
    e2e) run e2e 420 "$PY" benchmarks/trainer_e2e.py --size paper --loaders mem 0 8 --keep-going $(common_args) ;;
    caption) run caption 540 "$PY" benchmarks/caption_throughput.py --shape 8b --batch-sizes 32 64 128 \
      --weights-dir /tmp/bench-llava --keep-going $(common_args) ;;
    b4-clip) run b4-clip 300 "$PY" "$t" --sizes paper --models DiT-B/4 --texts clip-l --keep-going $(common_args) ;;
    xl2-clip) run xl2-clip 360 "$PY" "$t" --sizes paper --models DiT-XL/2 --texts clip-l --keep-going $(common_args) ;;
    caption-2) run caption-2 300 "$PY" benchmarks/caption_throughput.py --shape 8b --batch-sizes 64 128 --repeats 2 \
      --weights-dir /tmp/bench-llava --keep-going $(common_args) ;;
    fsdp) FSDP_CHECK_OUT="$OUTDIR" run fsdp 200 bash benchmarks/gpu_fsdp_check.sh ;;
    caption-sweep)
      run caption-sweep 420 "$PY" -P benchmarks/captioner_sweep.py --out /tmp/caption-sweep --device cuda \
        --num-train "${SWEEP_TRAIN:-10000}" --epochs "${SWEEP_EPOCHS:-3}" --parallel 6 --timeout 330 \
        --variants l2h128 l4h128 l4h256 l6h256 l8h256 l4h256-tower --pack "$OUTDIR/best_captioner.tar"
      [ "$DRY" = 1 ] || cp /tmp/caption-sweep/sweep.md /tmp/caption-sweep/sweep.json "$OUTDIR/" 2>/dev/null ;;
    data) run data 300 "$PY" benchmarks/data_cpu.py --samples 1000 --image-size 512 --device cpu \
      --markdown "$OUTDIR/tables.md" --json "$OUTDIR/results.jsonl" ;;
  esac
}

main() {
  local parts=()
  while [ $# -gt 0 ]; do
    local a="$1"
    shift
    case "$a" in
      --fetch-wheels) fetch_wheels; exit $? ;;
      --dry-run) DRY=1 ;;
      --out) OUTDIR="$(mkdir -p "$1" && cd "$1" && pwd)"; shift ;;
      --time-limit) LIMIT="$1"; shift ;;
      -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
      all) parts+=(env smoke train-b4 train-b2 train-xl2 train-pad e2e caption data) ;;
      *) parts+=("$a") ;;
    esac
  done
  [ ${#parts[@]} -gt 0 ] || parts=(env smoke train-b4 train-b2 train-xl2 train-pad e2e caption data)
  for p in "${parts[@]}"; do
    case "$p" in
      env|smoke|train-b4|train-b2|train-xl2|train-pad|e2e|caption|data|b4-clip|xl2-clip|caption-2|fsdp|caption-sweep) ;;
      *) echo "unknown part '$p' (env smoke train-b4 train-b2 train-xl2 train-pad e2e caption data b4-clip xl2-clip caption-2 fsdp caption-sweep all)" >&2
         exit 2 ;;
    esac
  done
  # BENCH_ALLOW_NO_GPU=1 lets `env` (and the install) be tried on a machine without a GPU.
  if [ "$DRY" = 0 ] && [ "${BENCH_ALLOW_NO_GPU:-0}" != 1 ] && [ "$DEVICE" != cpu ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no nvidia-smi here: run this on the GPU machine, or pass --dry-run" >&2
    exit 1
  fi
  setup
  for p in "${parts[@]}"; do part "$p"; done
  [ "$DRY" = 1 ] || echo "tables: $OUTDIR/tables.md"
}

main "$@"
