"""Step-level comparison of a real one-worker run and its simulation (issue 7; CPU, seconds).

The 15% table says *that* a percentile misses; this says which steps differ. Both reports' receive times
are grouped into engine steps (`tandem.sim.calibrate.token_clusters`, as calibrate does) and compared on:
- steps inside runs of long (prefill chunk) steps, by prompts admitted in the step (0 / 1 / 2 / 3+):
  what run 3 used to show that admission is paid per prefill step, not per prompt;
- the long inter-token gaps requests see while decoding (count, mean, p50 / p90): what sets TPOT on a
  prefill-heavy slice;
- TTFT: real - sim per request (same plan: the `tandem sim` run of the same bench flags), median and
  p10 / p90, so a slice-to-slice offset of the frontend path shows apart from the queueing tail;
- with --window-s: the long steps' median per time window of the slice (a uniform slowdown shows in every
  window, a one-off stall such as a compilation in one), and the per-request TTFT / TPOT ratio second /
  first (p10 / p50 / p90).

Two real runs of the same plan compare the same way (run 3 vs run 4 of slice D, docs/benchmarks.md):

    python benchmarks/sim_steps.py real_D.json sim_D.json [--long-ms 5]
    python benchmarks/sim_steps.py run3/real_D.json run4/real_D.json --names run3,run4 --window-s 0.5
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


def step_windows(report: dict, window_s: float, long_s: float = 0.005) -> dict[int, list[float]]:
    """Durations (s) of busy steps longer than `long_s`, keyed by the time window (index of `window_s` since
    the first send) in which they end: whether a slowdown is spread over the run or sits in a few windows."""
    cl = token_clusters(report_events(report))
    out: dict[int, list[float]] = {}
    for j in range(1, len(cl)):
        g = cl[j][0] - cl[j - 1][0]
        if g > long_s and cl[j][2].keys() & cl[j - 1][2].keys():     # busy before it: a step duration
            out.setdefault(int(cl[j][0] // window_s), []).append(g)
    return out


def latency_ratios(first: dict, second: dict, key: str) -> list[float]:
    """second / first of one request's TTFT or TPOT (vLLM's definition), per request idx ok in both, sorted."""
    def per(rep):
        out = {}
        for r in rep.get("requests", []):
            if r.get("status") != "ok" or not r.get("ttft_s"):
                continue
            if key == "ttft":
                out[r["idx"]] = r["ttft_s"]
            elif (r.get("output_tokens") or 0) > 1 and r.get("e2e_s") and r["e2e_s"] > r["ttft_s"]:
                out[r["idx"]] = (r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1)
        return out
    a, b = per(first), per(second)
    return sorted(b[i] / a[i] for i in a.keys() & b.keys())


def compare_windows(first: dict, second: dict, window_s: float, long_s: float = 0.005,
                    names: tuple[str, str] = ("real", "sim")) -> str:
    """Per-window long-step medians side by side, then the per-request latency ratios."""
    wa, wb = step_windows(first, window_s, long_s), step_windows(second, window_s, long_s)
    lines = [f"steps > {long_s * 1e3:g} ms per {window_s:g} s window: {names[0]} / {names[1]} median ms (steps)"]
    for w in sorted(wa.keys() | wb.keys()):
        cell = [f"{1e3 * _pct(sorted(v), 0.5):.1f} ({len(v)})" if v else "- (0)" for v in (wa.get(w), wb.get(w))]
        lines.append(f"  {w * window_s:6.1f} s  {cell[0]:>12s} / {cell[1]}")
    for key in ("ttft", "tpot"):
        r = latency_ratios(first, second, key)
        if r:
            lines.append(f"{key.upper()} {names[1]} / {names[0]} per request: p10 {_pct(r, 0.1):.2f}, median "
                         f"{_pct(r, 0.5):.2f}, p90 {_pct(r, 0.9):.2f} ({len(r)} requests)")
    return "\n".join(lines)


def compare(real: dict, sim: dict, long_s: float = 0.005, names: tuple[str, str] = ("real", "sim")) -> str:
    lines = [f"steps inside runs of steps > {long_s * 1e3:g} ms, by prompts admitted: mean ms (steps)"]
    for name, rep in zip(names, (real, sim)):
        runs = long_step_runs(rep, long_s)
        lines.append(f"  {name:4s} " + "  ".join(
            f"{k if k < 3 else '3+'}: {1e3 * sum(v) / len(v):.1f} ({len(v)})" for k, v in sorted(runs.items())))
    lines.append(f"inter-token gaps > {long_s * 1e3:g} ms seen by requests: count, mean, p50 / p90 ms")
    for name, rep in zip(names, (real, sim)):
        g = long_itls(rep, long_s)
        lines.append(f"  {name:4s} " + (f"{len(g)}, {1e3 * sum(g) / len(g):.1f}, {1e3 * _pct(g, 0.5):.1f} / "
                                        f"{1e3 * _pct(g, 0.9):.1f}" if g else "none"))
    d = ttft_diffs(real, sim)
    if d:
        lines.append(f"TTFT {names[0]} - {names[1]} per request (ms): p10 {1e3 * _pct(d, 0.1):.1f}, median "
                     f"{1e3 * _pct(d, 0.5):.1f}, p90 {1e3 * _pct(d, 0.9):.1f} ({len(d)} requests)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("real")
    p.add_argument("sim")
    p.add_argument("--long-ms", type=float, default=5.0, help="a step or gap longer than this is a prefill step")
    p.add_argument("--names", default="real,sim", help="labels of the two reports, comma-separated")
    p.add_argument("--window-s", type=float, default=0.0,
                   help="also print long-step medians per window of this many seconds and per-request ratios")
    a = p.parse_args(argv)
    names = tuple(a.names.split(",", 1)) if "," in a.names else ("real", "sim")
    with open(a.real, encoding="utf-8") as f:
        real = json.load(f)
    with open(a.sim, encoding="utf-8") as f:
        sim = json.load(f)
    print(compare(real, sim, a.long_ms / 1e3, names))
    if a.window_s > 0:
        print(compare_windows(real, sim, a.window_s, a.long_ms / 1e3, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
