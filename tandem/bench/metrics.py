"""Metric definitions (pure functions), equal to vLLM's `bench serve`.

- TTFT: send -> first streamed chunk carrying output.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL:  gaps between consecutive streamed chunks with output, pooled over requests.
- E2E:  send -> end of the stream.
Latency distributions use successful requests only; percentiles use linear interpolation
(numpy's default). A request meets the SLO when TTFT <= slo_ttft and TPOT <= slo_tpot (a
one-token answer has no TPOT and meets that part); goodput = such requests / duration.
Empty data gives None (JSON null), never NaN.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from tandem.bench.records import RequestRecord

PCTS = (50, 90, 99)


def dist(values: Sequence[float], scale: float = 1.0) -> dict:
    """{"mean","p50","p90","p99"} of values * scale; all None when empty."""
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64) * scale
    p = np.percentile(a, PCTS)
    return {"mean": float(a.mean()), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def ttft(r: RequestRecord) -> float | None:
    if r.ttft_s is not None:
        return r.ttft_s
    return r.token_times_s[0] if r.token_times_s else None


def tpot(r: RequestRecord) -> float | None:
    t = ttft(r)
    if r.output_tokens <= 1 or t is None or r.e2e_s is None:
        return None
    return (r.e2e_s - t) / (r.output_tokens - 1)


def itls(r: RequestRecord) -> list[float]:
    tt = r.token_times_s
    return [tt[i] - tt[i - 1] for i in range(1, len(tt))]


def meets_slo(r: RequestRecord, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_s is not None:
        t = ttft(r)
        if t is None or t > slo_ttft_s:
            return False
    if slo_tpot_s is not None:
        tp = tpot(r)
        if tp is not None and tp > slo_tpot_s:
            return False
    return True


def run_window(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """(start, end) of a run: first scheduled arrival to the last end of any request."""
    if not records:
        return 0.0, 0.0
    start = min(r.arrival_s for r in records)
    end = start
    for r in records:
        e = r.arrival_s + r.dispatch_lag_s + (r.e2e_s or 0.0)
        if e > end:
            end = e
    return start, end


def gpu_hours_from_timeline(timeline: Sequence[dict], start: float, end: float) -> float | None:
    """Integrate `num_gpus` (a step function, held from each sample to the next) over [start, end]."""
    pts = sorted((float(e["t_s"]), float(e["num_gpus"])) for e in timeline
                 if e.get("num_gpus") is not None and e.get("t_s") is not None)
    if not pts or end <= start:
        return None
    total = 0.0
    cur = pts[0][1]           # before the first sample: assume its value
    t = start
    for ts, n in pts:
        if ts <= t:
            cur = n
            continue
        if ts >= end:
            break
        total += cur * (ts - t)
        t, cur = ts, n
    total += cur * (end - t)
    return total / 3600.0


def cost_per_mtok_usd(gpu_hours: float | None, usd_per_gpu_hour: float | None,
                      output_tokens: int) -> float | None:
    if gpu_hours is None or usd_per_gpu_hour is None or output_tokens <= 0:
        return None
    return gpu_hours * usd_per_gpu_hour / (output_tokens / 1e6)


def _div(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(records: Sequence[RequestRecord], duration_s: float, *,
              slo_for: dict[str, tuple[float | None, float | None]] | None = None,
              default_slo: tuple[float | None, float | None] = (None, None),
              gpu_hours: float | None = None, mean_gpus: float | None = None,
              usd_per_gpu_hour: float | None = None) -> dict:
    """One summary block M for the given records (a class, or all of them).

    slo_for maps class -> (ttft_s, tpot_s); classes not in it use default_slo. goodput and
    slo_attainment are None when no SLO applies to any of the records.
    """
    slo_for = slo_for or {}
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    ttfts = [t for r in ok if (t := ttft(r)) is not None]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    itl_all: list[float] = []
    for r in ok:
        itl_all.extend(itls(r))
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.isl for r in ok)

    any_slo = False
    good = 0
    for r in records:
        s_ttft, s_tpot = slo_for.get(r.cls, default_slo)
        if s_ttft is not None or s_tpot is not None:
            any_slo = True
        if meets_slo(r, s_ttft, s_tpot):
            good += 1
    goodput = _div(good, duration_s) if any_slo else None
    m = {
        "requests_total": len(records),
        "requests_completed": len(ok),
        "requests_failed": len(failed),
        "duration_s": duration_s,
        "request_throughput": _div(len(ok), duration_s),
        "output_throughput": _div(out_tok, duration_s),
        "total_token_throughput": _div(out_tok + in_tok, duration_s),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "ttft_ms": dist(ttfts, 1e3),
        "tpot_ms": dist(tpots, 1e3),
        "itl_ms": dist(itl_all, 1e3),
        "e2e_ms": dist(e2es, 1e3),
        "goodput": goodput,
        "goodput_per_gpu": (goodput / mean_gpus if goodput is not None and mean_gpus else None),
        "slo_attainment": (good / len(records) if any_slo and records else None),
        "gpu_hours": gpu_hours,
        "cost_per_mtok_usd": cost_per_mtok_usd(gpu_hours, usd_per_gpu_hour, out_tok),
        "errors": dict(sorted(Counter(r.error_kind or "unknown" for r in failed).items())),
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.osl_requested),
        "prefix_cache_hit_rate": _cache_hit_rate(ok),
        "dispatch_lag_ms": dist([r.dispatch_lag_s for r in records], 1e3),
    }
    return m


def _cache_hit_rate(ok: Sequence[RequestRecord]) -> float | None:
    """Prompt tokens served from the server's prefix cache / prompt tokens, where it reports them."""
    rep = [r for r in ok if r.cached_tokens is not None]
    total = sum((r.prompt_tokens if r.prompt_tokens is not None else r.isl) for r in rep)
    return sum(r.cached_tokens for r in rep) / total if rep and total else None


def dispatch_stats(records: Iterable[RequestRecord]) -> dict:
    """Client health: how far sends fell behind the schedule, and the rates scheduled and sent."""
    recs = list(records)
    lags = [r.dispatch_lag_s for r in recs]
    lag = dist(lags, 1e3)
    lag["max"] = float(max(lags) * 1e3) if lags else None
    sends = sorted(r.arrival_s + r.dispatch_lag_s for r in recs)
    span = sends[-1] - sends[0] if len(sends) > 1 else 0.0
    sched = sorted(r.arrival_s for r in recs)
    sspan = sched[-1] - sched[0] if len(sched) > 1 else 0.0
    return {
        "dispatch_lag_ms": lag,
        "send_rate": (len(sends) - 1) / span if span > 0 else None,
        "scheduled_rate": (len(sched) - 1) / sspan if sspan > 0 else None,
    }


def finite_or_none(x):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return x
