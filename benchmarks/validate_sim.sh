#!/usr/bin/env bash
# Sim-vs-reality validation (issue 7) in one device call, with a held-out slice:
#   1. `tandem profile` of the model on this GPU (the engine as it is today; falls back to the
#      checked-in profile if it fails);
#   2. one real `tandem serve` (one worker), warmed up, then `tandem bench` of slices A, B, C of the same
#      trace (different --trace-start, different load), back to back on the same server;
#   3. on the CPU: `python -m tandem.sim.calibrate` measures the serving overheads on slice A's token
#      timeline (writes profile_cal.json), then `tandem sim` of B and C with that profile and no knobs;
#   4. prints real vs sim for A (calibration slice), B and C (held out) with the 15% verdict per row.
# From the repo root, with the frontend wheels and the trace in .whl/ (see docs/benchmarks.md):
#   bash benchmarks/validate_sim.sh                      # GPU: ~3-4 min on an H100
#   DEVICE=cpu MODEL=/tmp/tiny PRESET=tiny N=30 SCALE=1 MAX_ISL=300 MAX_OSL=24 SLICES="A:0 B:600" \
#       PROFILE=profiles/h100_llama-3.2-1b.json bash benchmarks/validate_sim.sh   # CPU dry run
# Env: N (requests per slice, 400), SCALE (trace time scale, 0.3), SLICES ("A:0 B:1200 C:600 D:900:<code
# trace>:200": name:trace start s[:trace[:requests]], the first one calibrates; a slice whose trace is
# missing is skipped; the conv trace is 1,753 s long), START_WARMUP (1600), N_WARMUP
# (100), TRACE, MODEL/PRESET, PROFILE (skip step 1 and use this file), ENGINE (serve/sim engine flags),
# PORT, OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
TRACE=${TRACE:-.whl/traces/azure2023_conv_181546-184500.csv}
[ -f "$TRACE" ] || TRACE=../shared/traces/azure2023_conv_181546-184500.csv
N=${N:-400}; SCALE=${SCALE:-0.3}
CODE=$(dirname "$TRACE")/azure2023_code_181703-184500.csv
SLICES=${SLICES:-A:0 B:1200 C:600 D:900:$CODE:200}   # name:start s[:trace[:requests]]; the first calibrates
MAX_ISL=${MAX_ISL:-4096}; MAX_OSL=${MAX_OSL:-512}
MODEL=${MODEL:-/tmp/m1b}; PRESET=${PRESET:-llama-3.2-1b}; PORT=${PORT:-8123}
ENGINE=${ENGINE:---max-num-seqs 256 --max-num-batched-tokens 2048}
# slice spec name:start[:trace[:requests]] -> S, START and LOAD (the bench/sim load flags of that slice)
slice_load() {
    local tr n
    IFS=: read -r S START tr n <<< "$1"
    LOAD="--trace ${tr:-$TRACE} --max-requests ${n:-$N} --time-scale $SCALE --max-isl $MAX_ISL --max-osl $MAX_OSL"
    # a prompt seed per slice (its name's character code): prompts are seeded by (seed, request index), so one
    # seed for all would repeat the warm-up's and earlier slices' prompts (prefix-cache hits the sim does not
    # have: 53-73% of slices B-D's prompt tokens in today's run 2)
    LOAD="$LOAD --jitter 0 --trace-start $START --seed $(printf '%d' "'$S")"
}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
# host speed (CPU, launch cost, GPU clocks) before the profile and before each slice: eager prefill is host-
# launch bound, so it tells machine variance from a code change (runs 3 vs 4 of slice D, docs/benchmarks.md)
host_probe() { python3 benchmarks/host_probe.py --device "$DEVICE" --label "$1" --append "$OUT/host.jsonl" ||
    echo "host probe failed"; }
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 -m tandem.cli model init "$MODEL" --preset "$PRESET" || exit 1

# 1. profile (same engine, same GPU, same call)
host_probe start
if [ -z "${PROFILE:-}" ]; then
    stamp "tandem profile"
    if timeout 300 python3 -m tandem.cli profile --model "$MODEL" --preset "$PRESET" --out "$OUT/profile.json" \
            > "$OUT/profile.log" 2>&1; then
        PROFILE=$OUT/profile.json
        grep -E "decode b= *1 ctx= *1024|decode b= *32 ctx= *1024|prefill +512 tok|worker adds|not measured|^wrote" "$OUT/profile.log"
    else
        tail -5 "$OUT/profile.log"
        PROFILE=profiles/h100_$PRESET.json
        [ -f "$PROFILE" ] || PROFILE=profiles/h100_llama-3.2-1b.json
        echo "tandem profile failed: using the checked-in $PROFILE"
    fi
fi
stamp "profile: $PROFILE"

# 2. serve + bench the slices
stamp "tandem serve"
# GC pause log of the server's processes (benchmarks/gclog; GC_LOG=0 turns it off)
GCENV=""; [ "${GC_LOG:-1}" = 1 ] && GCENV="TANDEM_GC_LOG_DIR=$OUT/gc PYTHONPATH=$PWD/benchmarks/gclog:$PYTHONPATH"
env $GCENV python3 -m tandem.cli serve --model "$MODEL" --served-model-name m --port "$PORT" --device "$DEVICE" --workers 1 \
    $ENGINE --log-level warning > "$OUT/serve.log" 2>&1 &
SRV=$!
trap 'kill $SRV 2>/dev/null' EXIT
for i in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/health" || { echo "server did not come up"; tail -20 "$OUT/serve.log"; exit 1; }; echo
BENCH="python3 -m tandem.cli bench --url http://127.0.0.1:$PORT --model m --no-progress"
# warm-up (first-use compilation of prefill shapes: 0.2-1.2 s stalls in the first seconds of a run), not measured
$BENCH --trace "$TRACE" --max-requests "${N_WARMUP:-100}" --time-scale "$SCALE" --trace-start "${START_WARMUP:-1600}" --max-isl "$MAX_ISL" \
    --max-osl 32 --jitter 0 --seed 1000 --out "$OUT/warmup.json" > "$OUT/warmup.log" 2>&1 || tail -3 "$OUT/warmup.log"
DONE=""
for SL in $SLICES; do
    slice_load "$SL"
    TR=$(echo "$LOAD" | cut -d' ' -f2)
    [ -f "$TR" ] || { echo "slice $S: no trace $TR, skipped"; continue; }
    DONE="$DONE $SL"
    host_probe "before-$S"
    stamp "bench slice $S ($LOAD)"
    $BENCH $LOAD --out "$OUT/real_$S.json" > "$OUT/bench_$S.log" 2>&1 || { tail -20 "$OUT/bench_$S.log"; exit 1; }
    grep -E "requests ok|output tok/s|TTFT p50|TTFT p90|TPOT p50|TPOT p90|dispatch lag" "$OUT/bench_$S.log"
done
kill $SRV; wait $SRV 2>/dev/null; trap - EXIT; sleep 2     # workers write their GC logs at exit
tail -3 "$OUT/serve.log"

# 3. calibrate on the first slice, simulate the others with its profile and no knobs (CPU)
SIM="--gpus 1 $ENGINE --no-progress --quiet"
SLICES=${DONE# }
slice_load "${SLICES%% *}"; CS=$S
stamp "calibrate on slice $CS"
python3 -m tandem.sim.calibrate --real "$OUT/real_$CS.json" $LOAD --profile "$PROFILE" $SIM \
    --out "$OUT/sim_$CS.json" --write-profile "$OUT/profile_cal.json" > "$OUT/calibrate.log" 2>&1 || { cat "$OUT/calibrate.log"; exit 1; }
cat "$OUT/calibrate.log"
stamp "sims of the held-out slices (profile_cal.json, no knobs) and uncalibrated sims"
for SL in $SLICES; do
    slice_load "$SL"
    [ "$S" = "$CS" ] || python3 -m tandem.cli sim $LOAD --profile "$OUT/profile_cal.json" $SIM \
        --out "$OUT/sim_$S.json" || exit 1
    python3 -m tandem.cli sim $LOAD --profile "$PROFILE" $SIM --step-overhead-ms 0 \
        --seq-overhead-ms 0 --new-overhead-ms 0 --request-overhead-ms 0 --out "$OUT/sim_${S}_raw.json" || exit 1
done

# 4. tables (also in $OUT/validation.md)
python3 - "$OUT" "$PROFILE" $SLICES <<'PY' | tee "$OUT/validation.md"
import json, sys
from tandem.sim.calibrate import all_within, table
out, profile, slices = sys.argv[1], sys.argv[2], [s.split(":") for s in sys.argv[3:]]
load = lambda n: json.load(open(f"{out}/{n}.json"))
cal = load("profile_cal")["serving_overhead"]
q = cal.get("new_q") or []
qs = (f"; admission time quantiles p50 {q[len(q) // 2] * 1e3:.2f}, p90 {q[round(0.9 * (len(q) - 1))] * 1e3:.2f}, "
      f"max {q[-1] * 1e3:.2f} ms") if q else ""
print(f"profile: {profile}")
print(f"serving overheads measured on slice {slices[0][0]}: {cal['step_s'] * 1e3:.3f} ms/step + "
      f"{cal['seq_s'] * 1e3:.4f} ms/seq + {cal['new_s'] * 1e3:.3f} ms/"
      f"{'new request' if cal.get('new_per', 'request') == 'request' else 'prefill step'} (mean){qs}; "
      f"{cal['request_s'] * 1e3:.3f} ms/request before the router")
for i, (s, start, *rest) in enumerate(slices):
    real = load(f"real_{s}")
    o = real["summary"]["overall"]
    what = "calibration slice" if i == 0 else "HELD-OUT slice"
    src = real["config"].get("source", "")
    print(f"\n### slice {s}: {src} from {start} s ({what}; {o['requests_completed']} ok, {o['requests_failed']} "
          f"failed, {o['request_throughput']:.2f} req/s) -- calibrated sim")
    ok = [r for r in real.get("requests", []) if r.get("status") == "ok"]
    hit = sum(r.get("cached_tokens") or 0 for r in ok) / max(1, sum(r["isl"] for r in ok))
    print(f"prefix-cache hits in the real run: {hit:.1%} of prompt tokens (the sim has none)")
    print(table(real, load(f"sim_{s}"), verdict=True))
    print(f"all rows within 15%: {'YES' if all_within(real, load(f'sim_{s}')) else 'NO'}")
    print(f"\nslice {s} -- sim from the profile alone (no serving overheads)")
    print(table(real, load(f"sim_{s}_raw")))
PY
REALS=""; for SL in $SLICES; do REALS="$REALS $OUT/real_${SL%%:*}.json"; done
python3 benchmarks/gclog/overlap.py "$OUT" "$OUT/profile_cal.json" $REALS | tee -a "$OUT/validation.md"
stamp "done"
# the device tool returns at most 8 files: pack the raw reports and logs into one archive
(cd "$OUT" && tar czf raw.tgz --remove-files real_*.json sim_*.json warmup.* serve.log bench_*.log host.jsonl gc 2>/dev/null; ls)
