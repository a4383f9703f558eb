"""Fit the simulator's serving overheads to a real run.

A perf profile times isolated engine steps. A real server adds host time that the profile does not
contain: per step (scheduling, detokenization, ZeroMQ, streaming) and per request (HTTP,
tokenization, routing). `tandem sim` models these with two knobs, `--step-overhead-ms` and
`--request-overhead-ms`. This tool finds values for them so that the simulation of a real run's
requests matches that run's TPOT p50 and TTFT p50:

    python -m tandem.sim.calibrate --real real.json  <the tandem sim flags of that run>

The tool iterates:

* step overhead: s += TPOT_p50(real) - TPOT_p50(sim), damped. TPOT is about one step per token, so
  the gap is about the missing per-step time;
* request overhead: r += TTFT_p50(real) - TTFT_p50(sim), after s.

It stops when both gaps are under `--tol` (2% by default) or after `--rounds` rounds. It prints both
values and the real-vs-calibrated table.

A fit on one slice is only a fit. Validate it on another slice: use another `--trace-start`, or
another trace. Report both in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import sys

ROWS = [("TTFT p50 ms", "ttft_ms", "p50"), ("TTFT p90 ms", "ttft_ms", "p90"), ("TPOT p50 ms", "tpot_ms", "p50"),
        ("TPOT p90 ms", "tpot_ms", "p90"), ("output tok/s", "output_throughput", None),
        ("requests/s", "request_throughput", None)]


def _get(m: dict, k: str, q: str | None):
    v = m.get(k)
    return v.get(q) if (q and isinstance(v, dict)) else v


def table(real: dict, sim: dict) -> str:
    """Markdown table of the overall summaries of two reports."""
    a, b = real["summary"]["overall"], sim["summary"]["overall"]
    lines = ["| metric | real | sim | sim/real |", "|---|---|---|---|"]
    for name, k, q in ROWS:
        x, y = _get(a, k, q), _get(b, k, q)
        if x is None or y is None:
            lines.append(f"| {name} | {x} | {y} | - |")
        else:
            lines.append(f"| {name} | {x:.2f} | {y:.2f} | {y / x if x else float('nan'):.3f} |")
    return "\n".join(lines)


def calibrate(real: dict, args, rounds: int = 8, tol: float = 0.02, damping: float = 0.8,
              log=None) -> tuple[float, float, dict, list]:
    """(step_overhead_ms, request_overhead_ms, sim report, history) fitted to `real`."""
    from tandem.sim.profile import SimProfile
    from tandem.sim.run import plan, simulate
    if isinstance(args.profile, str):
        args.profile = SimProfile.load(args.profile)
    reqs, info = plan(args)
    want = real["summary"]["overall"]
    tpot_r, ttft_r = _get(want, "tpot_ms", "p50"), _get(want, "ttft_ms", "p50")
    if tpot_r is None or ttft_r is None:
        raise ValueError("the real report has no TTFT/TPOT p50 (no successful multi-token requests?)")
    s, r = float(args.step_overhead_ms), float(args.request_overhead_ms)
    hist = []
    rep = None
    for i in range(rounds):
        args.step_overhead_ms, args.request_overhead_ms = s, r
        rep, _ = simulate(args, reqs, info)
        got = rep["summary"]["overall"]
        tpot_s, ttft_s = _get(got, "tpot_ms", "p50"), _get(got, "ttft_ms", "p50")
        hist.append({"round": i, "step_overhead_ms": round(s, 4), "request_overhead_ms": round(r, 4),
                     "tpot_p50_ms": tpot_s, "ttft_p50_ms": ttft_s})
        if log:
            log(f"round {i}: step +{s:.3f} ms, request +{r:.3f} ms -> TPOT p50 {tpot_s:.2f} "
                f"(real {tpot_r:.2f}), TTFT p50 {ttft_s:.2f} (real {ttft_r:.2f})")
        d_tpot, d_ttft = tpot_r - tpot_s, ttft_r - ttft_s
        if abs(d_tpot) <= tol * tpot_r and abs(d_ttft) <= tol * ttft_r:
            break
        if abs(d_tpot) > tol * tpot_r:
            s = max(0.0, s + damping * d_tpot)
        else:
            r = max(0.0, r + damping * d_ttft)
    return s, r, rep, hist


def main(argv=None) -> int:
    from tandem.sim.cli import add_arguments
    p = argparse.ArgumentParser(prog="python -m tandem.sim.calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, metavar="REAL.json", help="the tandem bench report of the real run")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tol", type=float, default=0.02, help="relative gap accepted on TPOT/TTFT p50")
    add_arguments(p)
    args = p.parse_args(argv)
    with open(args.real, encoding="utf-8") as f:
        real = json.load(f)
    args.quiet = True
    s, r, rep, hist = calibrate(real, args, rounds=args.rounds, tol=args.tol,
                                log=lambda m: print(m, file=sys.stderr))
    from tandem.bench.report import write_report
    rep["config"]["sim"]["calibration"] = {"real": args.real, "history": hist}
    write_report(args.out, rep)
    print(f"--step-overhead-ms {s:.3f} --request-overhead-ms {r:.3f}")
    print(table(real, rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
