#!/bin/bash
# The GPU tests, then every benchmark, in one call of under 10 minutes (what the README's GPU figures
# come from). Each step has its own time limit; a benchmark stopped by it (SIGINT) still saves the rows
# it measured. The log and every JSON go to $OUT (default: bench_results/).
#
#   bash gpu_check.sh                              # first launch configs (MAGMA_FLASH_AUTOTUNE=0)
#   MAGMA_FLASH_AUTOTUNE=1 bash gpu_check.sh       # autotuned kernels (slower: every config compiles)
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAGMA_FLASH_AUTOTUNE=${MAGMA_FLASH_AUTOTUNE:-0}
exec > >(tee "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
step() {  # step LIMIT NAME command...
  local limit=$1 name=$2; shift 2
  echo "=== [$SECONDS s] $name (limit $limit s)"
  timeout -s INT -k 20 "$limit" "$@"; echo "=== [$SECONDS s] $name exit $?"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
step 100 tests $PY -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_gpt.py tests/test_magma.py \
  tests/test_train.py -k "(gpu or cuda) and not interpreted and not without_gpu"
step 130 attention $PY bench.py attention --warmup 3 --iters 20 --shapes gpt2,gptj,vit-b16,vit-l14-336,long,decode \
  --json "$OUT/attention.json"
step 90 train $PY bench.py train --warmup 2 --iters 10 --variants transformers,transformers-bf16lm,ours-fp32lm,ours-sdpa,ours \
  --json "$OUT/train.json"
step 70 generate $PY bench.py generate --new-tokens 128 --warmup 1 --iters 3 --json "$OUT/generate.json"
step 60 big $PY bench.py big --max-batch 64 --warmup 1 --iters 3 --json "$OUT/big.json"
step 80 train-compile $PY bench.py train --warmup 2 --iters 10 --variants ours-compile,ours-sdpa-compile \
  --json "$OUT/train_compile.json"
left=$((560 - SECONDS))
if [ $left -gt 25 ]; then
  step $left attention-d256 $PY bench.py attention --warmup 3 --iters 20 --shapes gptj-d256 --json "$OUT/attention_d256.json"
fi
echo "=== done at $SECONDS s"
