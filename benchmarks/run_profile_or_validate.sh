#!/usr/bin/env bash
# One device call (carry [".whl"], timeout_s 600) that does what the card it lands on is for (session 6):
#   H200: `run_engine_gpu.sh full` (profiles of llama-3.1-8b and llama-3.2-1b: profiles/h200_*.json) and,
#         in the time left, the sim validation of llama-3.2-1b with the fresh profile;
#   H100: the sim validation of llama-3.1-8b (conversation slices A-C and the code-trace slice D).
#   MODE=val8b: the llama-3.1-8b validation on whichever card it lands on (its profile is measured in the call).
# Results (at most 8 files) go to $OUT. BUDGET (s, default 575): when to stop, counted from the start.
T0=$(date +%s); BUDGET=${BUDGET:-575}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
date -u; nvidia-smi -L
if [ "${MODE:-}" != val8b ] && nvidia-smi -L | grep -q H200; then
    OUT=$OUT/eng BENCH_TIMEOUT=$(( BUDGET * 55 / 100 )) bash benchmarks/run_engine_gpu.sh full > /dev/null 2>&1
    echo "engine rc=$? after $(( $(date +%s) - T0 )) s"
    tail -n 75 "$OUT/eng/log.txt"
    (cd "$OUT/eng" && tar czf ../eng_raw.tgz bench_*.json ceilings.json --remove-files 2>/dev/null)
    P=$OUT/eng/profiles/h200_llama-3.2-1b.json; [ -f "$P" ] || P=profiles/h100_llama-3.2-1b.json
    REM=$(( BUDGET - ($(date +%s) - T0) )); echo "validate_sim: PROFILE=$P, $REM s left"
    PROFILE=$P OUT=/tmp/val timeout -k 5 $REM bash benchmarks/validate_sim.sh 2>&1 | tee "$OUT/val_log.txt"
    tar czf "$OUT/val_raw.tgz" -C /tmp val
else
    MODEL=/tmp/m8b PRESET=llama-3.1-8b SCALE=0.6 N=${N:-300} N_WARMUP=60 \
        SLICES="A:0 B:1200 C:600 D:900:.whl/traces/azure2023_code_181703-184500.csv:200" OUT=/tmp/v8 \
        timeout -k 5 $(( BUDGET - 15 )) bash benchmarks/validate_sim.sh 2>&1 | tee "$OUT/val_log.txt"
    cp /tmp/v8/validation.md /tmp/v8/profile.json /tmp/v8/profile_cal.json "$OUT/" 2>/dev/null
    tar czf "$OUT/v8_raw.tgz" -C /tmp v8
fi
echo "done after $(( $(date +%s) - T0 )) s"; ls -la "$OUT"
