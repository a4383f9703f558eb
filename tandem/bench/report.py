"""The report JSON shared by `tandem bench` and `tandem sim`, and its summary table.

    {"config": {...}, "summary": {"overall": M, "<class>": M, ...},
     "requests": [RequestRecord as dict, ...], "timeline": [{"t_s": ..., ...}, ...],
     "client": {"dispatch_lag_ms": {...}, "send_rate": ..., "scheduled_rate": ...}}

`build_report` is pure: the summary is computed from the records exactly as they appear in
"requests" (times rounded to the microsecond first), so recomputing it from the JSON gives the same
numbers. Config keys it reads: slo_ttft_ms, slo_tpot_ms, slo_by_class ({cls: {"ttft_ms",
"tpot_ms"}}), gpus, gpu_hour_usd.

GPU hours: `gpus` x duration when `gpus` is set; otherwise integrated from the timeline's
`num_gpus` samples (from /v1/cluster, or a simulator's pool sizes); otherwise null. A class's share
of GPU hours is its share of processed tokens (prompt + output of completed requests), so the
classes' gpu_hours add up to the overall figure.
"""
from __future__ import annotations

import json
import math
from typing import Iterable, Sequence

from tandem.bench.metrics import dispatch_stats, gpu_hours_from_timeline, run_window, summarize
from tandem.bench.records import RequestRecord, as_record

OVERALL = "overall"


def load_config(args) -> dict:
    """The load-flag keys of a report's "config", in report order: `tandem bench` and `tandem sim` take
    the same load flags and must report them alike, so a sim run can be checked against the bench run."""
    return {
        "time_scale": args.time_scale,
        "trace_start_s": args.trace_start,
        "duration_limit_s": args.duration,
        "max_requests": args.max_requests,
        "rate": args.rate,
        "arrival": args.arrival,
        "seed": args.seed,
        "max_isl": args.max_isl,
        "max_osl": args.max_osl,
        "classify": args.classify,
    }


def _slo_map(config: dict) -> tuple[tuple, dict]:
    def s(v):
        return None if v is None else float(v) / 1e3
    default = (s(config.get("slo_ttft_ms")), s(config.get("slo_tpot_ms")))
    per = {}
    for cls, d in (config.get("slo_by_class") or {}).items():
        per[cls] = (s(d.get("ttft_ms")), s(d.get("tpot_ms")))
    return default, per


def build_report(config: dict, records: Iterable, timeline: Sequence[dict] = (), *,
                 duration_s: float | None = None) -> dict:
    """The report for per-request records (RequestRecord or dicts) and a timeline (pure)."""
    recs = [RequestRecord.from_dict(as_record(r).to_dict()) for r in records]
    timeline = [dict(e) for e in timeline]
    start, end = run_window(recs)
    duration = float(duration_s) if duration_s is not None else end - start
    default_slo, slo_by_class = _slo_map(config)
    gpus = config.get("gpus")
    price = config.get("gpu_hour_usd")
    if gpus:
        gpu_hours = float(gpus) * duration / 3600.0
        source = "gpus"
    else:
        gpu_hours = gpu_hours_from_timeline(timeline, start, start + duration)
        source = "timeline" if gpu_hours is not None else None
    mean_gpus = gpu_hours * 3600.0 / duration if gpu_hours is not None and duration > 0 else None

    kw = dict(slo_for=slo_by_class, default_slo=default_slo, mean_gpus=mean_gpus,
              usd_per_gpu_hour=price)
    summary = {OVERALL: summarize(recs, duration, gpu_hours=gpu_hours, **kw)}
    classes = sorted({r.cls for r in recs})
    tokens = {c: sum(r.isl + r.output_tokens for r in recs if r.cls == c and r.ok) for c in classes}
    total_tokens = sum(tokens.values())
    for c in classes:
        sub = [r for r in recs if r.cls == c]
        gh = (gpu_hours * tokens[c] / total_tokens) if gpu_hours is not None and total_tokens else None
        summary[c if c != OVERALL else "overall (class)"] = summarize(sub, duration, gpu_hours=gh, **kw)

    client = dispatch_stats(recs)
    if config.get("client_cpu_s") is not None:
        client["cpu_s"] = config["client_cpu_s"]
        client["cpu_ms_per_request"] = 1e3 * config["client_cpu_s"] / len(recs) if recs else None
    cfg = dict(config)
    cfg["gpu_hours_source"] = source
    cfg["cost_allocation"] = "class share of prompt+output tokens of completed requests"
    cfg["metric_definitions"] = ("vLLM bench serve: TTFT to first output chunk; TPOT=(E2E-TTFT)/"
                                 "(output_tokens-1); ITL=gaps between output chunks; percentiles "
                                 "linear; latencies over successful requests")
    return _clean({
        "config": cfg,
        "summary": summary,
        "requests": [r.to_dict(ndigits=None) for r in recs],
        "timeline": timeline,
        "client": client,
    })


def records_of(report: dict) -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in report.get("requests", [])]


_SCALARS = (int, str, bool, type(None))


def _clean(o):
    """NaN/inf -> None, recursively (the JSON stays strict)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):                       # scalars inline: a report holds ~20 per request
        return {k: (v if type(v) in _SCALARS else None if type(v) is float and not math.isfinite(v)
                    else v if type(v) is float else _clean(v)) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        if all(type(v) is float for v in o):       # token times: no call per element
            return [v if math.isfinite(v) else None for v in o]
        return [_clean(v) for v in o]
    return o


def write_report(path: str, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        # dumps, not dump: dump streams through the pure-Python encoder, dumps uses the C one (~5x faster)
        f.write(json.dumps(report, allow_nan=False, separators=(",", ":")))
        f.write("\n")


class OutputError(OSError):
    """The report or its plots could not be written; the message names which and where."""


def save_outputs(report: dict, out: str, plot_dir: str | None) -> list[str]:
    """Write the report JSON to `out` and, with `plot_dir`, its plots (returns their paths): the output
    step of both `tandem bench` and `tandem sim`."""
    try:
        write_report(out, report)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e}") from None
    if not plot_dir:
        return []
    from tandem.bench.plots import write_plots
    try:
        return write_plots(report, plot_dir)
    except OSError as e:
        raise OutputError(f"cannot write plots to {plot_dir}: {e}") from None


def load_report(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- rich summary table

def _f(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def summary_table(report: dict, title: str | None = None):
    """Metrics as rows, classes as columns (fits a terminal with several classes)."""
    from rich.table import Table
    summ = report["summary"]
    t = Table(title=title, title_justify="left")
    t.add_column("metric", no_wrap=True)
    for name in summ:
        t.add_column(name, justify="right", no_wrap=True, style="bold" if name == OVERALL else None)

    def pct(key, q):
        return [_f(m[key][q], 2) for m in summ.values()]

    rows = [
        ("requests ok / failed", [f"{m['requests_completed']} / {m['requests_failed']}" for m in summ.values()]),
        ("request/s", [_f(m["request_throughput"], 2) for m in summ.values()]),
        ("output tok/s", [_f(m["output_throughput"]) for m in summ.values()]),
        *[(f"{name} {q} ms", pct(key, q)) for name, key in
          (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
          for q in ("p50", "p90", "p99")],
        ("goodput req/s", [_f(m["goodput"], 2) for m in summ.values()]),
        ("goodput req/s/GPU", [_f(m.get("goodput_per_gpu"), 3) for m in summ.values()]),
        ("SLO attainment %", ["-" if m["slo_attainment"] is None else f"{100 * m['slo_attainment']:.1f}"
                              for m in summ.values()]),
        ("prefix cache hit %", ["-" if m.get("prefix_cache_hit_rate") is None
                                else f"{100 * m['prefix_cache_hit_rate']:.1f}" for m in summ.values()]),
        ("GPU hours", [_f(m["gpu_hours"], 4) for m in summ.values()]),
        ("$ / M output tok", [_f(m["cost_per_mtok_usd"], 3) for m in summ.values()]),
    ]
    if any(m["errors"] for m in summ.values()):
        rows.append(("errors", [", ".join(f"{k}={v}" for k, v in m["errors"].items()) or "-"
                                for m in summ.values()]))
    for label, cells in rows:
        t.add_row(label, *cells)
    return t


def print_summary(report: dict, console=None) -> None:
    from rich.console import Console
    console = console or Console()
    cfg = report.get("config", {})
    console.print(f"[bold]tandem bench[/] · {cfg.get('source', '')} · model {cfg.get('model', '')}"
                  + (f" · {cfg['label']}" if cfg.get("label") else ""))
    console.print(summary_table(report))
    over = report["summary"][OVERALL]
    if over["short_outputs"]:
        console.print(f"{over['short_outputs']} completed requests returned fewer tokens than "
                      f"requested (server ignored ignore_eos/min_tokens?)", style="yellow")
    cl = report.get("client", {})
    lag = cl.get("dispatch_lag_ms", {})
    if lag.get("p50") is not None:
        console.print(f"client: dispatch lag p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms, "
                      f"max {lag['max']:.2f} ms; sent {_f(cl.get('send_rate'), 1)} req/s "
                      f"(scheduled {_f(cl.get('scheduled_rate'), 1)} req/s); duration "
                      f"{over['duration_s']:.1f} s"
                      + (f"; client CPU {cl['cpu_ms_per_request']:.2f} ms/request"
                         if cl.get("cpu_ms_per_request") is not None else ""), style="dim")
