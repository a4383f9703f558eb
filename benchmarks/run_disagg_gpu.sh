#!/usr/bin/env bash
# Issue #6 GPU run in ONE device-tool call (kind nvidia-h200-x2, carry [".whl"], timeout_s 600):
#   bash benchmarks/run_disagg_gpu.sh [extra benchmarks/disagg.py flags]
# llama-3.1-8b random weights written to /tmp/m8b (reused if the machine still has them); work files in
# /tmp/<bench>. Prints nvidia-smi topo -m, the peer-copy and KV-transfer table and the 1P1D-vs-aggregated
# serving table (see benchmarks/disagg.py). benchmarks/run_planner_gpu.sh runs planner_gpu.py through this.
# Back in $OUT: log.txt (everything printed), <result>.json (all numbers), runs.tgz (bench reports, server logs).
set -uo pipefail
BENCH=${BENCH:-disagg}; RESULT=${RESULT:-disagg}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; W=/tmp/$BENCH; mkdir -p "$OUT" "$W"
{ date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "GPUs", torch.cuda.device_count())'
} 2>&1 | tee "$OUT/log.txt"
timeout 540 python3 "benchmarks/$BENCH.py" --out "$W" --model /tmp/m8b --preset llama-3.1-8b "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
cp "$W/$RESULT.json" "$OUT/" 2>/dev/null
tar czf "$OUT/runs.tgz" -C "$W" --exclude='*.jsonl' . 2>/dev/null
exit "$rc"
