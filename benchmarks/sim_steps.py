"""Step-level comparison of a real one-worker run and its simulation (issue 7; CPU, seconds).

The 15% table says *that* a percentile misses; this says which steps differ. Both reports' receive times
are grouped into engine steps (`tandem.sim.calibrate.token_clusters`, as calibrate does) and compared on:
- steps inside runs of long (prefill chunk) steps, by prompts admitted in the step (0 / 1 / 2 / 3+):
  what run 3 used to show that admission is paid per prefill step, not per prompt;
- the long inter-token gaps requests see while decoding (count, mean, p50 / p90): what sets TPOT on a
  prefill-heavy slice;
- TTFT: real - sim per request (same plan: the `tandem sim` run of the same bench flags), median and
  p10 / p90, so a slice-to-slice offset of the frontend path shows apart from the queueing tail.

    python benchmarks/sim_steps.py real_D.json sim_D.json [--long-ms 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tandem.sim.calibrate import _pct, report_events, token_clusters  # noqa: E402


def long_step_runs(report: dict, long_s: float = 0.005) -> dict[int, list[float]]:
    """Durations (s) of busy steps that, like the step before them, took longer than `long_s`, keyed by
    the prompts whose first token they produced (3 = three or more)."""
    cl = token_clusters(report_events(report))
    out: dict[int, list[float]] = {}
    for j in range(2, len(cl)):
        if not cl[j][2].keys() & cl[j - 1][2].keys():
            continue                                          # idle before it: not a step duration
        g, gp = cl[j][0] - cl[j - 1][0], cl[j - 1][0] - cl[j - 2][0]
        if g > long_s and gp > long_s:
            out.setdefault(min(3, sum(1 for i in cl[j][2].values() if i == 0)), []).append(g)
    return out


def long_itls(report: dict, long_s: float = 0.005) -> list[float]:
    """Inter-token gaps (s) longer than `long_s` of every successful request, sorted."""
    out = []
    for r in report.get("requests", []):
        tt = r.get("token_times_s") or []
        if r.get("status") == "ok":
            out += [b - a for a, b in zip(tt, tt[1:]) if b - a > long_s]
    return sorted(out)


def ttft_diffs(real: dict, sim: dict) -> list[float]:
    """real - sim TTFT (s) per request idx present in both (sorted)."""
    s = {r["idx"]: r["ttft_s"] for r in sim.get("requests", []) if r.get("status") == "ok"}
    return sorted(r["ttft_s"] - s[r["idx"]] for r in real.get("requests", [])
                  if r.get("status") == "ok" and r["idx"] in s and r.get("ttft_s") is not None)


def compare(real: dict, sim: dict, long_s: float = 0.005) -> str:
    lines = [f"steps inside runs of steps > {long_s * 1e3:g} ms, by prompts admitted: mean ms (steps)"]
    for name, rep in (("real", real), ("sim", sim)):
        runs = long_step_runs(rep, long_s)
        lines.append(f"  {name:4s} " + "  ".join(
            f"{k if k < 3 else '3+'}: {1e3 * sum(v) / len(v):.1f} ({len(v)})" for k, v in sorted(runs.items())))
    lines.append(f"inter-token gaps > {long_s * 1e3:g} ms seen by requests: count, mean, p50 / p90 ms")
    for name, rep in (("real", real), ("sim", sim)):
        g = long_itls(rep, long_s)
        lines.append(f"  {name:4s} " + (f"{len(g)}, {1e3 * sum(g) / len(g):.1f}, {1e3 * _pct(g, 0.5):.1f} / "
                                        f"{1e3 * _pct(g, 0.9):.1f}" if g else "none"))
    d = ttft_diffs(real, sim)
    if d:
        lines.append(f"TTFT real - sim per request (ms): p10 {1e3 * _pct(d, 0.1):.1f}, median "
                     f"{1e3 * _pct(d, 0.5):.1f}, p90 {1e3 * _pct(d, 0.9):.1f} ({len(d)} requests)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("real")
    p.add_argument("sim")
    p.add_argument("--long-ms", type=float, default=5.0, help="a step or gap longer than this is a prefill step")
    a = p.parse_args(argv)
    with open(a.real, encoding="utf-8") as f:
        real = json.load(f)
    with open(a.sim, encoding="utf-8") as f:
        sim = json.load(f)
    print(compare(real, sim, a.long_ms / 1e3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
