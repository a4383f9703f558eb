#!/usr/bin/env bash
# Issue #8 GPU run in ONE device-tool call (kind nvidia-h200-x2, carry [".whl"], timeout_s 600):
#   bash benchmarks/run_planner_gpu.sh [extra benchmarks/planner_gpu.py flags]
# Prints per-flip timings (swing → decision → done), lost requests and goodput planner vs static 1P1D;
# $OUT gets log.txt, planner.json, runs.tgz (see run_disagg_gpu.sh, which this runs).
BENCH=planner_gpu RESULT=planner exec bash "$(dirname "$0")/run_disagg_gpu.sh" "$@"
