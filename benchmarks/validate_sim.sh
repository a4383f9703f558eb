#!/usr/bin/env bash
# Sim-vs-reality validation (issue 7): the same Azure conversation trace slice through a real
# `tandem serve` (one GPU worker, llama-3.2-1b random weights) measured by `tandem bench`, and through
# `tandem sim` with the H100 profile; prints both summaries side by side.
# Run through the device tool from the repo root, with the wheels and trace in .whl/ (see docs/benchmarks.md).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRACE=${TRACE:-.whl/traces/azure2023_conv_181546-184500.csv}
N=${N:-400}; SCALE=${SCALE:-1.0}
LOAD="--trace $TRACE --max-requests $N --time-scale $SCALE --max-isl 4096 --max-osl 512 --jitter 0"
ENGINE="--max-num-seqs 256 --max-num-batched-tokens 2048"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f /tmp/m1b/config.json ] || python3 -m tandem.cli model init /tmp/m1b --preset llama-3.2-1b || exit 1
python3 -m tandem.cli serve --model /tmp/m1b --served-model-name m --port 8123 --device cuda --workers 1 $ENGINE \
    --log-level warning > "$OUT/serve.log" 2>&1 &
SRV=$!
for i in $(seq 1 180); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 1; done
curl -s http://127.0.0.1:8123/health; echo
python3 -m tandem.cli bench --url http://127.0.0.1:8123 --model m $LOAD --out "$OUT/real.json" --no-progress 2>&1 | tail -25
kill $SRV; wait $SRV 2>/dev/null
python3 -m tandem.cli sim $LOAD --gpus 1 --profile profiles/h100_llama-3.2-1b.json $ENGINE --out "$OUT/sim.json" \
    --no-progress 2>&1 | tail -5
python3 - "$OUT/real.json" "$OUT/sim.json" <<'PY'
import json, sys
real, sim = (json.load(open(p))["summary"]["overall"] for p in sys.argv[1:3])
rows = [("TTFT p50 ms", "ttft_ms", "p50"), ("TTFT p90 ms", "ttft_ms", "p90"), ("TPOT p50 ms", "tpot_ms", "p50"),
        ("TPOT p90 ms", "tpot_ms", "p90"), ("output tok/s", "output_throughput", None),
        ("requests/s", "request_throughput", None), ("completed", "requests_completed", None)]
print(f"| metric | real | sim | sim/real |\n|---|---|---|---|")
for name, k, q in rows:
    a, b = (real[k][q] if q else real[k]), (sim[k][q] if q else sim[k])
    print(f"| {name} | {a:.2f} | {b:.2f} | {b / a if a else float('nan'):.3f} |")
PY
tail -5 "$OUT/serve.log"
