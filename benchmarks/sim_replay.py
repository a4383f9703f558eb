"""Offline sim-vs-real replay of a validate_sim.sh run "as run" (CPU, seconds; issue 7).

The sim of a trace slice assumes the prompts the trace describes. A real run may differ in its inputs:
requests leave the client a little late (dispatch lag), and prompts may hit the server's prefix cache
(run 2 of 2026-11-23 reused earlier slices' prompts: 53-73% of B-D's prompt tokens were cache hits).
This replays each real report with its own inputs: one JSONL trace per report with the arrivals as
sent and each prompt's *prefill work* (tokens less its cache hits) as its length; then calibrates on
the first report (`python -m tandem.sim.calibrate`, method steps) and simulates the others with that
profile and no knobs, printing the same tables as validate_sim.sh. The cache-hit shortcut leaves out
the attention over the cached prefix, so it is an approximation for runs with many hits.

    python benchmarks/sim_replay.py --profile PROFILE.json --out /tmp/replay real_A.json real_B.json ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tandem.sim.calibrate import all_within, table  # noqa: E402

ENGINE = ["--gpus", "1", "--max-num-seqs", "256", "--max-num-batched-tokens", "2048"]


def as_run_rows(report: dict) -> list[dict]:
    """JSONL rows (timestamp ms, input_length = prompt tokens less cache hits, output_length as run) of
    a report's successful requests, in send order."""
    recs = [r for r in report.get("requests", []) if r.get("status") == "ok"]
    if not recs:
        raise ValueError("the report has no successful requests")
    sent = lambda r: r["arrival_s"] + (r.get("dispatch_lag_s") or 0.0)   # noqa: E731
    t0 = min(sent(r) for r in recs)
    return [{"timestamp": round((sent(r) - t0) * 1e3, 4),
             "input_length": max(1, int(r["isl"]) - int(r.get("cached_tokens") or 0)),
             "output_length": max(1, int(r["output_tokens"]))} for r in sorted(recs, key=sent)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reals", nargs="+", metavar="REAL.json", help="tandem bench reports; the first calibrates")
    p.add_argument("--profile", required=True)
    p.add_argument("--out", default="/tmp/sim_replay")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    from tandem.sim.calibrate import main as calibrate
    from tandem.sim.cli import main as sim
    names, reals = [], []
    for path in args.reals:
        with open(path, encoding="utf-8") as f:
            reals.append(json.load(f))
        names.append(os.path.splitext(os.path.basename(path))[0].removeprefix("real_"))
        with open(f"{args.out}/asrun_{names[-1]}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in as_run_rows(reals[-1]))
    load = lambda n: ["--trace", f"{args.out}/asrun_{n}.jsonl", "--time-scale", "1",  # noqa: E731
                      "--max-isl", "1000000", "--max-osl", "1000000", "--jitter", "0", *ENGINE,
                      "--no-progress", "--quiet"]
    cal = f"{args.out}/profile_cal.json"
    if calibrate(["--real", args.reals[0], *load(names[0]), "--profile", args.profile,
                  "--out", f"{args.out}/sim_{names[0]}.json", "--write-profile", cal]) != 0:
        return 2
    ok_all = True
    for i, (n, real) in enumerate(zip(names, reals)):
        if i and sim([*load(n), "--profile", cal, "--out", f"{args.out}/sim_{n}.json"]) != 0:
            return 2
        with open(f"{args.out}/sim_{n}.json", encoding="utf-8") as f:
            rep = json.load(f)
        cached = sum(r.get("cached_tokens") or 0 for r in real["requests"] if r.get("status") == "ok")
        total = sum(r["isl"] for r in real["requests"] if r.get("status") == "ok")
        print(f"\n### {n} as run ({'calibration' if i == 0 else 'held out'}; prefix-cache hits "
              f"{cached / max(total, 1):.0%} of prompt tokens)")
        print(table(real, rep, verdict=True))
        ok = all_within(real, rep)
        ok_all &= ok or i == 0
        print(f"all rows within 15%: {'YES' if ok else 'NO'}")
    print(f"\nheld-out reports all within 15%: {'YES' if ok_all else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
