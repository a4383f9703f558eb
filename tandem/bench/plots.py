"""PNG plots of a report: latency CDFs per class, and a timeline of the run.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import os

import numpy as np

from tandem.bench.metrics import itls, tpot, ttft
from tandem.bench.records import RequestRecord
from tandem.bench.report import records_of


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _colors(classes):
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    return {c: cmap(i % 10) for i, c in enumerate(classes)}


def _latencies(recs: list[RequestRecord]) -> dict[str, list[float]]:
    ok = [r for r in recs if r.ok]
    out = {"TTFT": [], "TPOT": [], "ITL": [], "E2E": []}
    for r in ok:
        t = ttft(r)
        if t is not None:
            out["TTFT"].append(t * 1e3)
        tp = tpot(r)
        if tp is not None:
            out["TPOT"].append(tp * 1e3)
        out["ITL"].extend(x * 1e3 for x in itls(r))
        if r.e2e_s is not None:
            out["E2E"].append(r.e2e_s * 1e3)
    return out


def plot_latency_cdfs(report: dict, path: str) -> str:
    recs = records_of(report)
    classes = sorted({r.cls for r in recs})
    colors = _colors(classes)
    cfg = report.get("config", {})
    slo = {"TTFT": cfg.get("slo_ttft_ms"), "TPOT": cfg.get("slo_tpot_ms")}
    fig = _figure(11, 8)
    axes = fig.subplots(2, 2)
    per_class = {c: _latencies([r for r in recs if r.cls == c]) for c in classes}
    for ax, metric in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E")):
        lo, hi = np.inf, 0.0
        for c in classes:
            v = np.sort(np.asarray(per_class[c][metric]))
            if len(v) == 0:
                continue
            y = np.arange(1, len(v) + 1) / len(v)
            ax.step(v, y, where="post", color=colors[c], label=f"{c} (n={len(v)})")
            pos = v[v > 0]
            if len(pos):
                lo, hi = min(lo, pos[0]), max(hi, pos[-1])
        if slo.get(metric):
            ax.axvline(slo[metric], color="red", ls="--", lw=1, label=f"SLO {slo[metric]:g} ms")
        if hi > 0 and lo < np.inf and hi / lo > 50:
            ax.set_xscale("log")
        for q in (0.5, 0.9, 0.99):
            ax.axhline(q, color="0.85", lw=0.6, zorder=0)
        ax.set_title(f"{metric} CDF")
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_ylabel("fraction of requests" if metric != "ITL" else "fraction of chunks")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(_title(report))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.91, wspace=0.22, hspace=0.32)
    fig.savefig(path)
    return path


def _title(report: dict) -> str:
    cfg = report.get("config", {})
    return f"{cfg.get('source', '')}  →  {cfg.get('url', '')}  model={cfg.get('model', '')}"


def plot_timeline(report: dict, path: str) -> str:
    recs = records_of(report)
    tl = report.get("timeline", [])
    classes = sorted({r.cls for r in recs})
    colors = _colors(classes)
    has_pools = any(e.get("pools") for e in tl)
    n_rows = 4 if has_pools else 3
    fig = _figure(11, 2.6 * n_rows)
    axes = fig.subplots(n_rows, 1, sharex=True)
    end = max([r.arrival_s + r.dispatch_lag_s + (r.e2e_s or 0) for r in recs] + [1.0])
    bin_s = _nice_bin(end / 60.0)
    bins = np.arange(0.0, end + bin_s, bin_s)

    ax = axes[0]
    bottom = np.zeros(len(bins) - 1)
    for c in classes:
        h, _ = np.histogram([r.arrival_s for r in recs if r.cls == c], bins=bins)
        rate = h / bin_s
        ax.stairs(bottom + rate, bins, baseline=bottom.copy(), fill=True, color=colors[c],
                  alpha=0.8, label=c)
        bottom += rate
    ax.set_ylabel("arrivals / s")
    ax.set_title(_title(report))
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)

    ax = axes[1]
    for c in classes:
        pts = [(r.arrival_s, ttft(r) * 1e3) for r in recs if r.cls == c and r.ok and ttft(r) is not None]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=6, color=colors[c], label=c)
    bad = [r.arrival_s for r in recs if not r.ok]
    if bad:
        ax.scatter(bad, [0] * len(bad), marker="x", color="red", s=14, label=f"failed ({len(bad)})")
    slo = report.get("config", {}).get("slo_ttft_ms")
    if slo:
        ax.axhline(slo, color="red", ls="--", lw=1, label=f"SLO {slo:g} ms")
    ax.set_ylabel("TTFT (ms)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)

    ax = axes[2]
    ev = []
    tok_t, tok_w = [], []
    for r in recs:
        s0 = r.arrival_s + r.dispatch_lag_s
        ev.append((s0, 1))
        ev.append((s0 + (r.e2e_s or 0.0), -1))
        if r.token_times_s:
            w = r.output_tokens / len(r.token_times_s) if r.output_tokens else 1.0
            tok_t.extend(s0 + x for x in r.token_times_s)
            tok_w.extend([w] * len(r.token_times_s))
    ev.sort()
    if ev:
        xs, ys, n = [0.0], [0], 0
        for t_, d in ev:
            n += d
            xs.append(t_)
            ys.append(n)
        ax.step(xs, ys, where="post", color="C0", lw=1)
    ax.set_ylabel("requests in flight", color="C0")
    ax2 = ax.twinx()
    if tok_t:
        h, _ = np.histogram(tok_t, bins=bins, weights=tok_w)
        ax2.step(bins[:-1], h / bin_s, where="post", color="C1", lw=1)
    ax2.set_ylabel("output tok/s", color="C1")
    ax.grid(alpha=0.3)

    if has_pools:
        ax = axes[3]
        pts = [e for e in tl if e.get("pools")]
        roles = sorted({k for e in pts for k in e["pools"]})
        ts = [e["t_s"] for e in pts]
        for i, role in enumerate(roles):
            ax.step(ts, [e["pools"].get(role, 0) for e in pts], where="post", label=role,
                    color=f"C{i + 2}")
        ax.set_ylabel("workers per pool")
        from matplotlib.ticker import MaxNLocator
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time since start (s)")
    fig.subplots_adjust(left=0.08, right=0.92, bottom=0.06, top=0.95, hspace=0.12)
    fig.savefig(path)
    return path


def _nice_bin(x: float) -> float:
    for b in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if x <= b:
            return float(b)
    return 600.0


def write_plots(report: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [plot_latency_cdfs(report, os.path.join(out_dir, "latency_cdf.png")),
            plot_timeline(report, os.path.join(out_dir, "timeline.png"))]
