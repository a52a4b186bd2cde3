#!/bin/bash
# The GPU tests, then the benchmarks, in one call (what the README's GPU figures come from). Each step
# has its own time limit, cut short when the whole run nears $BUDGET seconds; a benchmark stopped by it
# (SIGINT) still saves the rows it measured. The log and every result go to $OUT (default:
# bench_results/ in the repository root). Run it as `bash tests/gpu_check.sh`; `STEPS=profile,big bash
# tests/gpu_check.sh` runs only the steps named. The steps, the least known first:
#   tests            the GPU tests (bf16/fp16 kernels, determinism, CUDA graphs, a GPU training run)
#   attention        the kernel's first launch configs (MAGMA_FLASH_AUTOTUNE=0), either backward, vs SDPA
#   train            the training step: transformers assembly, ours eager (also with PyTorch's cross-entropy),
#                    CUDA-graphed and compiled
#   profile          Nsight Compute's counters for the attention kernels (tests/attention_profile.py):
#                    ncu_raw.csv, one row per kernel; the readable report goes to the log
#   attention_tuned  the Triton kernel autotuned (each config compiled and timed on first use: the short
#                    shapes where its backward lags, and long), the configs it chose in each row's note;
#                    with either backward, and the faster of the two (triton-autobwd; its note names it)
#   generate, big    greedy decoding vs transformers; the GPT-J-sized model
# A lease is 15 minutes of device time, the machine's start included: the default budget (480 s) leaves
# room for that start and for a rerun of a step that failed.
cd "$(dirname "$0")/.." || exit 1  # the repository root
OUT=${OUT:-bench_results}
BUDGET=${BUDGET:-480}
STEPS=${STEPS:-tests,attention,train,profile,attention_tuned,generate,big}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
step() {  # step LIMIT NAME command...: runs if named in $STEPS and at least 20 s of the budget are left
  local limit=$1 name=$2 left=$((BUDGET - SECONDS - 10)); shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  [ $left -lt $limit ] && limit=$left
  if [ $limit -lt 20 ]; then echo "=== [$SECONDS s] $name skipped: out of time"; return; fi
  echo "=== [$SECONDS s] $name (limit $limit s)"
  timeout -s INT -k 15 "$limit" "$@"; echo "=== [$SECONDS s] $name exit $?"
}
profile() {  # Nsight Compute on one forward+backward per shape (PROFILE_SHAPES) and implementation; its report
  local ncu rep=/tmp/attention_profile
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
  if [ -z "$ncu" ]; then echo "no ncu on this machine"; return 1; fi
  local sections=""
  for s in SpeedOfLight Occupancy LaunchStats WarpStateStats SchedulerStats ComputeWorkloadAnalysis \
           MemoryWorkloadAnalysis InstructionStats; do sections="$sections --section $s"; done
  "$ncu" --profile-from-start off --target-processes application-only --clock-control none $sections -f -o "$rep" \
    $PY tests/attention_profile.py --shapes ${PROFILE_SHAPES:-vit-b16,long} --impls triton,triton-fusedbwd,sdpa-flash || return
  "$ncu" --import "$rep.ncu-rep" --csv --page raw > "$OUT/ncu_raw.csv"
  "$ncu" --import "$rep.ncu-rep" --page details
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
SHAPES=gpt2,gptj,vit-b16,vit-l14-336,long,decode
export MAGMA_FLASH_AUTOTUNE=0
export -f profile
export PY OUT
step 100 tests $PY -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_gpt.py tests/test_vit.py \
  tests/test_magma.py tests/test_train.py tests/test_bench.py -k "(gpu or cuda) and not interpreted and not without_gpu"
# (triton-autobwd left out: with autotuning off it runs the two-kernel backward, as the "triton" rows do)
step 75 attention $PY bench.py attention --warmup 3 --iters 20 --shapes $SHAPES --json "$OUT/attention.json" \
  --impls triton,triton-fusedbwd,triton-1split,triton-4split,triton-16split,triton-blockkernel,sdpa-flash,sdpa-cudnn,\
sdpa-efficient,reference
step 180 train $PY bench.py train --warmup 2 --iters 10 \
  --variants transformers,ours-sdpa,ours-sdpa-torchce,ours,ours-fusedbwd,ours-sdpa-graph,ours-graph,ours-fusedbwd-graph,\
ours-compile,ours-sdpa-compile \
  --json "$OUT/train.json"
step 75 profile bash -c profile
MAGMA_FLASH_AUTOTUNE=1 step 100 attention_tuned $PY bench.py attention --warmup 3 --iters 20 \
  --shapes gpt2,vit-b16,vit-l14-336,long --impls triton,triton-fusedbwd,triton-autobwd,sdpa-flash \
  --json "$OUT/attention_tuned.json"
step 60 generate $PY bench.py generate --new-tokens 128 --warmup 1 --iters 3 --json "$OUT/generate.json"
step 50 big $PY bench.py big --max-batch 64 --warmup 1 --iters 3 --json "$OUT/big.json"
echo "=== done at $SECONDS s"
