#!/usr/bin/env bash
# Engine GPU checks and benchmarks, one device-tool call each (see docs/benchmarks.md):
#   bash benchmarks/run_engine_gpu.sh check   # kernel tests + microbenchmarks/tuning + quick 1B engine run (~5 min)
#   bash benchmarks/run_engine_gpu.sh full    # full table for llama-3.1-8b and llama-3.2-1b + profiles + HF (~4 min)
#   bash benchmarks/run_engine_gpu.sh final   # graph-timed kernel microbenchmarks, per-kernel decode traces, qwen3-8b (~8 min)
#   bash benchmarks/run_engine_gpu.sh async   # async-scheduling GPU test + decode async vs sync, 1B and 8B (~6 min)
#   bash benchmarks/run_engine_gpu.sh gemv    # one-row Triton GEMV: kernel tests, decode with it on and off (~4.5 min)
# Results go to $OUT (log.txt, *.json, table.md, profiles/).
set -o pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT
LOG="$OUT/log.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.used,memory.total --format=csv;
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'; } 2>&1 | tee "$LOG"
case "${1:-check}" in
check)
  timeout 180 python3 -m pytest -q --tb=short tests/engine/test_triton_attention.py 2>&1 | tail -n 80 | tee -a "$LOG"
  timeout 170 python3 benchmarks/engine.py kernels 2>&1 | tee -a "$LOG"
  timeout 200 python3 benchmarks/engine.py bench --presets llama-3.2-1b --quick --hf --steps 10 2>&1 | tee -a "$LOG"
  ;;
full)
  timeout 100 python3 -m pytest -q --tb=short tests/engine/test_triton_attention.py -k "decode or prefill or mixed or padding" 2>&1 | tail -n 40 | tee -a "$LOG"
  timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/engine.py bench --presets "${PRESETS:-llama-3.1-8b,llama-3.2-1b}" --profile-dir "$OUT/profiles" --hf 2>&1 | tee -a "$LOG"
  ;;
final)   # kernel microbenchmarks timed as CUDA-graph replays, per-kernel decode traces, qwen3-8b table
  timeout 130 python3 benchmarks/engine.py kernels --quick 2>&1 | tee -a "$LOG"
  timeout 180 python3 benchmarks/engine.py trace 2>&1 | tee -a "$LOG"
  timeout 230 python3 benchmarks/engine.py bench --presets qwen3-8b --hf 2>&1 | tee -a "$LOG"
  ;;
async)   # asynchronous scheduling: GPU correctness + sync-free check, then decode with steps ahead vs synchronous
  timeout 150 python3 -m pytest -q --tb=short tests/engine/test_async_scheduling.py 2>&1 | tail -n 30 | tee -a "$LOG"
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/engine.py bench --presets "${PRESETS:-llama-3.2-1b,llama-3.1-8b}" \
    --points "${POINTS:-1:1024,8:1024,32:1024,64:2048,128:1024,1:4096}" --no-prefill --steps 30 2>&1 | tee -a "$LOG"
  ;;
gemv)    # one-row Triton GEMV (issue 5): kernel checks, then decode with it ON (all points) and OFF (batch 1 only:
         # batches > 1 never take it); each engine start prints the per-projection timings it chose by (~4.5 min)
  timeout 50 python3 -m pytest -q --tb=short tests/engine/test_gemv.py tests/engine/test_async_scheduling.py -k "gemv or gpu or sync_probe" 2>&1 | tail -n 30 | tee -a "$LOG"
  date -u | tee -a "$LOG"
  OUT="$OUT/on" TANDEM_GEMV=1 timeout "${ON_TIMEOUT:-140}" python3 benchmarks/engine.py bench --presets "${PRESETS:-llama-3.2-1b,llama-3.1-8b}" \
    --points "${POINTS:-1:1024,8:1024,64:2048}" --no-prefill --steps 30 2>&1 | tee -a "$LOG"
  date -u | tee -a "$LOG"
  OUT="$OUT/off" TANDEM_GEMV=0 timeout "${OFF_TIMEOUT:-60}" python3 benchmarks/engine.py bench --presets "${PRESETS:-llama-3.2-1b,llama-3.1-8b}" \
    --points "${OFF_POINTS:-1:1024}" --no-prefill --steps 30 2>&1 | tee -a "$LOG"
  date -u | tee -a "$LOG"
  ;;
*) echo "usage: $0 check|full|final|async|gemv"; exit 2;;
esac
