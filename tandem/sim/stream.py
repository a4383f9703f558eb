"""Large runs in bounded memory: requests generated in arrival order instead of a list of millions,
and finished requests kept as columns of numbers instead of one object each.

1,000 busy GPUs for 30 minutes are ~24M requests. As `BenchRequest` + `SimReq` + `RequestRecord`
objects that is tens of GB; here it is ~60 bytes a request.

* `ReplicatedRequests` is `finalize(replicate(reqs, R, shift, seed))` (tandem.sim.run) as a lazy
  sequence: the same requests, arrival times, order and idx, built one at a time as the simulator
  consumes them (the order comes from one numpy sort of R x len(reqs) arrival times).
* `RecordColumns` takes each request as it ends (the simulator's `--records none` mode) and
  `summarize_columns` computes the report's summary block from them, the same numbers as
  `tandem.bench.metrics.summarize` over the records (times rounded to the microsecond as
  `build_report` does; tests compare the two).
"""
from __future__ import annotations

import random
from array import array
from collections import Counter

import numpy as np

from tandem.bench.metrics import cost_per_mtok_usd, dist


class ReplicatedRequests:
    """R copies of a sorted request list, merged by arrival; iterating yields fresh BenchRequests
    with `idx` 0..len-1. `base` is the one copy (for shapes and flags that R copies share)."""

    def __init__(self, base: list, R: int, shift: str = "random", seed: int = 0):
        self.base = base
        self.R = R
        n = len(base)
        if n == 0:
            self._order = np.zeros(0, dtype=np.int64)
            self._t = np.zeros(0)
            return
        a = np.array([r.arrival_s for r in base], dtype=np.float64)
        if np.any(np.diff(a) < 0):
            raise ValueError("ReplicatedRequests needs the base requests sorted by arrival")
        t0 = float(a.min())
        span = float(a.max()) - t0
        period = span + (span / max(1, n - 1) if n > 1 else 1.0)
        rng = random.Random(seed ^ 0x5EED)               # the same offsets as run.replicate
        rel = a - t0
        t = np.empty(R * n, dtype=np.float64)
        for c in range(R):
            off = 0.0 if (c == 0 or shift == "none") else rng.random() * period
            x = rel + off
            np.subtract(x, period, out=x, where=x >= period)
            t[c * n:(c + 1) * n] = t0 + x
        # stable sort by arrival: ties in copy order, then base order (= position in the flat array)
        self._order = np.argsort(t, kind="stable")
        self._t = t
        self._nss = max(r.namespace for r in base) + 1

    def __len__(self) -> int:
        return len(self._order)

    def _make(self, idx: int, k: int, t_k: float, dicts: list):
        """Request `idx` of the stream: copy k // n of base request k % n, arriving at `t_k`."""
        c, i = divmod(k, len(self.base))
        r = object.__new__(type(self.base[i]))
        d = r.__dict__
        d.update(dicts[i])
        d["arrival_s"] = t_k
        d["namespace"] += c * self._nss
        d["idx"] = idx
        return r

    def __iter__(self):
        """`_make` for every idx (`iter_positions` of the whole stream)."""
        return self.iter_positions(np.arange(len(self._order)))

    def iter_positions(self, positions: np.ndarray):
        """The requests at these stream positions (ascending), with their global idx: the whole
        stream, or one domain's share of it (`tandem.sim.shards`) without building the others'. The
        copy numbers and arrival times are read in chunks (a numpy scalar read per request cost
        ~0.5 us)."""
        dicts = [dict(r.__dict__) for r in self.base]
        make = self._make
        order, t = self._order, self._t
        C = 65536
        for lo in range(0, len(positions), C):
            ps = positions[lo:lo + C]
            ks = order[ps]
            for idx, k, t_k in zip(ps.tolist(), ks.tolist(), t[ks].tolist()):
                yield make(idx, k, t_k, dicts)

    def __getitem__(self, idx: int):
        idx = range(len(self))[idx]
        k = int(self._order[idx])
        return self._make(idx, k, float(self._t[k]), [r.__dict__ for r in self.base])

    def base_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(base request index, copy number) of every stream position."""
        n = len(self.base)
        return self._order % n, self._order // n

    @property
    def namespace_stride(self) -> int:
        """Copy c's prefix namespaces are the base's + c x this (copies never share prefixes)."""
        return self._nss

    def arrivals(self) -> np.ndarray:
        return self._t[self._order]

    def shape(self, shape_of) -> dict:
        """`shape_of(base)` (tandem.bench.cli._shape) with the counts, span and rate of all copies."""
        out = shape_of(self.base)
        for k, v in out.items():
            if k != "_all":
                v["requests"] *= self.R
        t = self.arrivals()
        span = float(t[-1] - t[0]) if len(t) else 0.0
        out["_all"] = {"requests": len(t), "span_s": span,
                       "mean_rate": (len(t) - 1) / span if span > 0 else None}
        return out


class RecordColumns:
    """Per-request results as columns (arrival order restored by `idx` when summarizing)."""

    def __init__(self):
        self.idx = array("q")
        self.arrival = array("d")
        self.lag = array("d")
        self.ttft = array("d")          # NaN: none (failed)
        self.e2e = array("d")
        self.n_out = array("l")
        self.isl = array("l")
        self.osl = array("l")
        self.cached = array("l")        # -1: not reported
        self.cls = array("h")
        self.ok = array("b")
        self.classes: dict[str, int] = {}
        self.errors: dict[int, str] = {}  # idx -> error kind of failed requests
        self.itl = array("d")           # inter-token gaps of requests whose token times were kept
        self.itl_cls = array("h")       # ... and the class id of each gap

    def add(self, br, lag: float, ok: bool, t_first, t_last, n_out: int, cached, times, error_kind=None):
        a = br.arrival_s + lag
        c = self.classes.setdefault(br.cls, len(self.classes))
        self.idx.append(br.idx)
        self.arrival.append(br.arrival_s)
        self.lag.append(lag)
        self.ttft.append(t_first - a if ok else float("nan"))
        self.e2e.append(t_last - a)
        self.n_out.append(n_out if ok else 0)
        self.isl.append(br.isl)
        self.osl.append(br.osl)
        self.cached.append(cached if (ok and cached is not None) else -1)
        self.cls.append(c)
        self.ok.append(1 if ok else 0)
        if not ok:
            self.errors[br.idx] = error_kind
        elif times:
            tt = [round(x - a, 6) for x in times]
            self.itl.extend(tt[i] - tt[i - 1] for i in range(1, len(tt)))
            self.itl_cls.extend([c] * (len(tt) - 1))

    def __len__(self) -> int:
        return len(self.idx)

    def arrays(self) -> dict:
        """numpy columns in idx order, times rounded to the microsecond (as the report's records)."""
        o = np.argsort(np.frombuffer(self.idx, dtype=np.int64), kind="stable")
        out = {}
        for k in ("idx", "arrival", "lag", "ttft", "e2e", "n_out", "isl", "osl", "cached", "cls", "ok"):
            col = np.array(getattr(self, k))[o]
            if k in ("arrival", "lag", "ttft", "e2e"):
                col = np.round(col, 6)
            out[k] = col
        out["ok"] = out["ok"].astype(bool)
        return out


def run_window_columns(a: dict) -> tuple[float, float]:
    """`tandem.bench.metrics.run_window` over columns."""
    if len(a["idx"]) == 0:
        return 0.0, 0.0
    start = float(a["arrival"].min())
    ends = a["arrival"] + a["lag"] + np.nan_to_num(a["e2e"])
    return start, max(start, float(ends.max()))


def summarize_columns(a: dict, mask: np.ndarray, duration_s: float, errors: dict, itl, *,
                      slo_of_cls: list, gpu_hours=None, mean_gpus=None, usd_per_gpu_hour=None) -> dict:
    """`tandem.bench.metrics.summarize` for the requests selected by `mask`; `slo_of_cls[c]` is the
    (ttft_s, tpot_s) of class id c."""
    def _div(x, y):
        return x / y if y > 0 else None
    ok = a["ok"] & mask
    n_all = int(mask.sum())
    n_ok = int(ok.sum())
    ttft, e2e, n_out = a["ttft"], a["e2e"], a["n_out"]
    has_tp = ok & (n_out > 1)
    tpot = (e2e[has_tp] - ttft[has_tp]) / (n_out[has_tp] - 1)
    out_tok = int(n_out[ok].sum())
    in_tok = int(a["isl"][ok].sum())
    s_ttft = np.array([np.inf if s[0] is None else s[0] for s in slo_of_cls] or [np.inf])[a["cls"]]
    s_tpot = np.array([np.inf if s[1] is None else s[1] for s in slo_of_cls] or [np.inf])[a["cls"]]
    any_slo = any(s[0] is not None or s[1] is not None for i, s in enumerate(slo_of_cls)
                  if np.any(mask & (a["cls"] == i)))
    tp_all = np.where(n_out > 1, (e2e - ttft) / np.maximum(n_out - 1, 1), -np.inf)
    good = int((ok & (ttft <= s_ttft) & (tp_all <= s_tpot)).sum())
    goodput = _div(good, duration_s) if any_slo else None
    failed_idx = set(a["idx"][mask & ~a["ok"]].tolist())
    errs = Counter(errors.get(i) or "unknown" for i in failed_idx)
    rep = ok & (a["cached"] >= 0)
    total = int(a["isl"][rep].sum())
    return {
        "requests_total": n_all,
        "requests_completed": n_ok,
        "requests_failed": n_all - n_ok,
        "duration_s": duration_s,
        "request_throughput": _div(n_ok, duration_s),
        "output_throughput": _div(out_tok, duration_s),
        "total_token_throughput": _div(out_tok + in_tok, duration_s),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "ttft_ms": dist(ttft[ok], 1e3),
        "tpot_ms": dist(tpot, 1e3),
        "itl_ms": dist(itl, 1e3),
        "e2e_ms": dist(e2e[ok], 1e3),
        "goodput": goodput,
        "goodput_per_gpu": (goodput / mean_gpus if goodput is not None and mean_gpus else None),
        "slo_attainment": (good / n_all if any_slo and n_all else None),
        "gpu_hours": gpu_hours,
        "cost_per_mtok_usd": cost_per_mtok_usd(gpu_hours, usd_per_gpu_hour, out_tok),
        "errors": dict(sorted(errs.items())),
        "short_outputs": int((ok & (n_out < a["osl"])).sum()),
        "prefix_cache_hit_rate": (int(a["cached"][rep].sum()) / total if rep.any() and total else None),
        "dispatch_lag_ms": dist(a["lag"][mask], 1e3),
    }


def report_from_columns(config: dict, cols: RecordColumns, timeline: list) -> dict:
    """`tandem.bench.report.build_report(config, records, timeline)` with the records as columns
    (the report's "requests" list is left empty)."""
    from tandem.bench.metrics import gpu_hours_from_timeline
    from tandem.bench.report import OVERALL, _clean, _slo_map, build_report
    a = cols.arrays()
    start, end = run_window_columns(a)
    duration = end - start
    skeleton = build_report(config, [], timeline, duration_s=duration)
    default_slo, slo_by_class = _slo_map(config)
    names = sorted(cols.classes, key=cols.classes.get)          # class id -> name
    slo_of_cls = [slo_by_class.get(c, default_slo) for c in names]
    gpus, price = config.get("gpus"), config.get("gpu_hour_usd")
    if gpus:
        gpu_hours = float(gpus) * duration / 3600.0
    else:
        gpu_hours = gpu_hours_from_timeline(timeline, start, start + duration)
    mean_gpus = gpu_hours * 3600.0 / duration if gpu_hours is not None and duration > 0 else None
    kw = dict(slo_of_cls=slo_of_cls, mean_gpus=mean_gpus, usd_per_gpu_hour=price)
    itl = np.frombuffer(cols.itl, dtype=np.float64) if len(cols.itl) else []
    everyone = np.ones(len(a["idx"]), dtype=bool)
    summary = {OVERALL: summarize_columns(a, everyone, duration, cols.errors, itl, gpu_hours=gpu_hours, **kw)}
    tokens = {}
    for c in sorted(names):
        m = a["cls"] == cols.classes[c]
        tokens[c] = int((a["isl"] + a["n_out"])[m & a["ok"]].sum())
    total_tokens = sum(tokens.values())
    for c in sorted(names):
        m = a["cls"] == cols.classes[c]
        gh = (gpu_hours * tokens[c] / total_tokens) if gpu_hours is not None and total_tokens else None
        sub_itl = itl[np.frombuffer(cols.itl_cls, dtype=np.int16) == cols.classes[c]] if len(itl) else []
        summary[c if c != OVERALL else "overall (class)"] = summarize_columns(
            a, m, duration, cols.errors, sub_itl, gpu_hours=gh, **kw)
    lag = dist(a["lag"], 1e3)
    lag["max"] = float(a["lag"].max() * 1e3) if len(a["lag"]) else None
    sends = np.sort(a["arrival"] + a["lag"])
    sched = a["arrival"]
    span = float(sends[-1] - sends[0]) if len(sends) > 1 else 0.0
    sspan = float(sched.max() - sched.min()) if len(sched) > 1 else 0.0
    skeleton["client"].update({"dispatch_lag_ms": lag,
                               "send_rate": (len(sends) - 1) / span if span > 0 else None,
                               "scheduled_rate": (len(sched) - 1) / sspan if sspan > 0 else None})
    skeleton["summary"] = _clean(summary)
    skeleton["config"]["gpu_hours_source"] = "gpus" if gpus else ("timeline" if gpu_hours is not None else None)
    return skeleton


_SIM_RECORD = None


def sim_record_class():
    """`RequestRecord` whose `to_dict` builds the same dict as the base class without
    `dataclasses.asdict` (which deep-copies field by field: ~35 us a record on Python 3.11)."""
    global _SIM_RECORD
    if _SIM_RECORD is not None:
        return _SIM_RECORD
    from dataclasses import fields

    from tandem.bench.records import RequestRecord
    names = tuple(f.name for f in fields(RequestRecord))
    rounded = ("arrival_s", "ttft_s", "e2e_s", "dispatch_lag_s")

    class SimRecord(RequestRecord):
        def to_dict(self, ndigits: int | None = 6) -> dict:
            d = {k: getattr(self, k) for k in names}
            if ndigits is not None:
                d["token_times_s"] = [round(t, ndigits) for t in self.token_times_s]
                for k in rounded:
                    if d[k] is not None:
                        d[k] = round(d[k], ndigits)
            else:
                d["token_times_s"] = list(self.token_times_s)
            return d

    _SIM_RECORD = SimRecord
    return SimRecord
