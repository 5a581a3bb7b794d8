#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go (about 6 minutes on an H200), for sessions that
# are lent a GPU for minutes: the gpu-marked tests, bench/gpu.py's full-size figures, train.py (bf16 autocast,
# fused AdamW, MFU, --compile), generate.py in bf16 / int4 / fp8, and the NCCL path of parallel.py.
#
#   OUT=/tmp/gpu-out bash bench/gpu_checks.sh       # logs: $OUT/log.txt, figures: $OUT/gpu.json
#
# Each step has its own time limit and a failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
RUN=${RUN:-/tmp/gpu-run}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - start)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

step bench 240 $PY bench/gpu.py --json "$OUT/gpu.json"
step tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py tests/test_quantize.py tests/test_lora.py
step train 150 $PY train.py --debug --device cuda --max-steps 100 --eval-interval 100 --out "$RUN/debug"
for q in none int4 fp8; do
    flag=$([ $q = none ] || echo "--quantize $q")
    step "generate_$q" 60 $PY generate.py --ckpt "$RUN/debug" --prompt "The list" --max-new-tokens 100 --temperature 0 $flag
done
step nccl 90 torchrun --nproc-per-node 1 parallel.py --ckpt "$RUN/debug" --dtype bf16 --check
step train_compile 150 $PY train.py --debug --device cuda --max-steps 40 --eval-interval 40 --compile --out "$RUN/compiled"
cp "$RUN/debug/loss.png" "$RUN/debug/routing.png" "$OUT/" 2>/dev/null
echo "=== done" | tee -a "$LOG"
