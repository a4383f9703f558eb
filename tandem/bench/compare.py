"""Compare report JSONs (bench or sim runs; e.g. Tandem vs vLLM vs Dynamo on the same trace).

    tandem bench --compare base.json other.json [...] [--plot DIR]
    python -m tandem.bench.compare base.json other.json [...] [--plot DIR]

Prints, per class present in every run, the headline metrics side by side with the change relative
to the first run (the baseline); --plot writes compare_cdf.png (TTFT/TPOT/ITL/E2E CDFs, overall).
"""
from __future__ import annotations

import argparse
import os
import sys

from tandem.bench.report import OVERALL, load_report, records_of

# (label, key, sub-key, higher is better)
METRICS = [
    ("requests ok", "requests_completed", None, True),
    ("requests failed", "requests_failed", None, False),
    ("request/s", "request_throughput", None, True),
    ("output tok/s", "output_throughput", None, True),
    ("TTFT p50 ms", "ttft_ms", "p50", False),
    ("TTFT p99 ms", "ttft_ms", "p99", False),
    ("TPOT p50 ms", "tpot_ms", "p50", False),
    ("TPOT p99 ms", "tpot_ms", "p99", False),
    ("ITL p99 ms", "itl_ms", "p99", False),
    ("E2E p50 ms", "e2e_ms", "p50", False),
    ("E2E p99 ms", "e2e_ms", "p99", False),
    ("goodput req/s", "goodput", None, True),
    ("goodput req/s/GPU", "goodput_per_gpu", None, True),
    ("SLO attainment", "slo_attainment", None, True),
    ("$ / M output tok", "cost_per_mtok_usd", None, False),
]


def run_label(report: dict, path: str) -> str:
    cfg = report.get("config", {})
    return str(cfg.get("label") or os.path.splitext(os.path.basename(path))[0])


def _get(m: dict, key: str, sub: str | None):
    v = m.get(key)
    if sub is not None:
        v = v.get(sub) if isinstance(v, dict) else None
    return v


def compare_rows(reports: list[dict]) -> list[tuple[str, str, list, list]]:
    """[(class, metric label, values per run, change vs run 0 in % (None for run 0))]."""
    classes = [c for c in reports[0]["summary"] if all(c in r["summary"] for r in reports)]
    if all(len(r["summary"]) == 2 for r in reports):
        classes = [OVERALL]          # one class: its block equals the overall one
    rows = []
    for cls in classes:
        for label, key, sub, _ in METRICS:
            vals = [_get(r["summary"][cls], key, sub) for r in reports]
            if all(v is None for v in vals):
                continue
            base = vals[0]
            deltas = [None] + [
                (100.0 * (v - base) / abs(base)) if isinstance(v, (int, float)) and
                isinstance(base, (int, float)) and base else None for v in vals[1:]]
            rows.append((cls, label, vals, deltas))
    return rows


def print_comparison(reports: list[dict], labels: list[str], console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    better = {label: hib for label, _, _, hib in METRICS}
    t = Table(title_justify="left")
    t.add_column("class", no_wrap=True)
    t.add_column("metric", no_wrap=True)
    for i, lab in enumerate(labels):
        t.add_column(lab + (" (base)" if i == 0 else ""), justify="right", no_wrap=True)
    last_cls = None
    for cls, metric, vals, deltas in compare_rows(reports):
        cells = []
        for v, d in zip(vals, deltas):
            s = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else
                                       f"{v:,.1f}" if isinstance(v, float) else str(v))
            if d is not None and abs(d) >= 0.05:
                good = (d > 0) == better[metric]
                s += f" [{'green' if good else 'red'}]({d:+.0f}%)[/]"
            cells.append(s)
        t.add_row(cls if cls != last_cls else "", metric, *cells,
                  end_section=False)
        last_cls = cls
    for lab, r in zip(labels, reports):
        cfg = r.get("config", {})
        console.print(f"[bold]{lab}[/]: {cfg.get('source', '?')} → {cfg.get('url', cfg.get('tool', '?'))} "
                      f"model {cfg.get('model', '?')}")
    console.print(t)


def plot_comparison(reports: list[dict], labels: list[str], path: str) -> str:
    import numpy as np

    from tandem.bench.plots import _figure, _latencies
    fig = _figure(11, 8)
    axes = fig.subplots(2, 2)
    lats = [_latencies(records_of(r)) for r in reports]
    for ax, metric in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E")):
        for i, (lab, lat) in enumerate(zip(labels, lats)):
            v = np.sort(np.asarray(lat[metric]))
            if len(v):
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color=f"C{i}", label=lab)
        ax.set_title(f"{metric} CDF (all classes)")
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.95, wspace=0.22, hspace=0.32)
    fig.savefig(path)
    return path


def compare_files(paths: list[str], plot_dir: str | None = None, console=None) -> int:
    from rich.console import Console
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    reports, labels = [], []
    for p in paths:
        try:
            r = load_report(p)
            r["summary"][OVERALL]
        except (OSError, ValueError, KeyError, TypeError) as e:
            err.print(f"[bold red]error:[/] {p} is not a readable tandem report ({type(e).__name__}: {e})")
            return 2
        reports.append(r)
        labels.append(run_label(r, p))
    if len(reports) < 2:
        err.print("[bold red]error:[/] --compare needs at least two reports")
        return 2
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    print_comparison(reports, labels, console)
    if plot_dir:
        os.makedirs(plot_dir, exist_ok=True)
        p = plot_comparison(reports, labels, os.path.join(plot_dir, "compare_cdf.png"))
        err.print(f"plot: {p}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.compare", description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--plot", default=None, metavar="DIR")
    a = ap.parse_args(argv)
    return compare_files(a.reports, a.plot)


if __name__ == "__main__":
    sys.exit(main())
