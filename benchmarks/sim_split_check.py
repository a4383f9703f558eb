"""Held-out check of the simulator's serving-overhead calibration on ONE existing real run (CPU only).

Splits a `tandem bench` report of a one-worker trace replay by request index: calibrates on the first
K requests (`python -m tandem.sim.calibrate`, steps method), simulates the remaining ones with the
calibrated profile and no knobs, and prints real vs sim for both parts. Caveat: the second part's
real run still carries the first part's requests in flight at its start; its simulation starts empty.

    python benchmarks/sim_split_check.py /work/.device/11/real.json \
        --trace ../shared/traces/azure2023_conv_181546-184500.csv \
        --profile profiles/h100_llama-3.2-1b.json [--split 200] [--out-dir /tmp/split]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("real")
    p.add_argument("--trace", required=True, help="the trace file the run replayed")
    p.add_argument("--profile", required=True)
    p.add_argument("--split", type=int, default=None, help="requests in the calibration part (default: half)")
    p.add_argument("--engine", default="--max-num-seqs 256 --max-num-batched-tokens 2048")
    p.add_argument("--out-dir", default="/tmp/sim_split_check")
    a = p.parse_args()
    from tandem.bench import traces as tr
    from tandem.bench.report import build_report, records_of, write_report
    from tandem.sim.calibrate import all_within, table
    real = json.load(open(a.real, encoding="utf-8"))
    cfg = real["config"]
    if cfg.get("trace_start_s"):
        print("the run must start at trace second 0 (request index = trace row)", file=sys.stderr)
        return 2
    recs = sorted(records_of(real), key=lambda r: r.idx)
    k = a.split or len(recs) // 2
    os.makedirs(a.out_dir, exist_ok=True)
    d = lambda n: os.path.join(a.out_dir, n)   # noqa: E731
    write_report(d("real_1.json"), build_report(cfg, recs[:k], real.get("timeline", [])))
    write_report(d("real_2.json"), build_report(cfg, recs[k:], real.get("timeline", [])))
    start2 = tr.read_trace(a.trace)[recs[k].idx].arrival_s
    load = ["--trace", a.trace, "--time-scale", str(cfg["time_scale"]), "--jitter", "0", "--gpus", "1", "--quiet",
            *(["--max-isl", str(cfg["max_isl"])] if cfg.get("max_isl") else []),
            *(["--max-osl", str(cfg["max_osl"])] if cfg.get("max_osl") else []), *a.engine.split()]
    py = sys.executable
    subprocess.run([py, "-m", "tandem.sim.calibrate", "--real", d("real_1.json"), *load, "--max-requests", str(k),
                    "--profile", a.profile, "--out", d("sim_1.json"), "--write-profile", d("profile_cal.json")],
                   check=True)
    subprocess.run([py, "-m", "tandem.sim", *load, "--max-requests", str(len(recs) - k), "--trace-start",
                    repr(start2), "--profile", d("profile_cal.json"), "--out", d("sim_2.json")], check=True)
    r2, s2 = (json.load(open(d(n), encoding="utf-8")) for n in ("real_2.json", "sim_2.json"))
    print(f"\nheld-out part: requests {k}..{len(recs) - 1}")
    print(table(r2, s2, verdict=True))
    print(f"all rows within 15%: {'YES' if all_within(r2, s2) else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
