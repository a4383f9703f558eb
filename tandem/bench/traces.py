"""Trace readers: Azure LLM inference 2023 CSV, Mooncake JSONL, and a generic JSONL.

Every reader returns a list of `BenchRequest` sorted by arrival, with arrivals rebased so that the
first row of the file is at t = 0 (trace seconds). `prepare_trace` then cuts a slice, jitters,
rescales time and caps lengths, in that order.

Generic JSONL (one object per line) accepts, besides the Mooncake fields:
``arrival_s`` (seconds) instead of ``timestamp`` (milliseconds), ``isl``/``osl`` instead of
``input_length``/``output_length``, and optional ``class`` and ``priority``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, field, replace
from datetime import date

PRIORITIES = ("interactive", "standard", "batch")
MOONCAKE_BLOCK = 512


class TraceError(ValueError):
    """A trace file cannot be read or parsed; the message says which file and line."""


@dataclass
class BenchRequest:
    """One request to send: when (seconds after the run starts), which class, and its shape."""
    arrival_s: float
    cls: str
    priority: str
    isl: int                                   # prompt tokens
    osl: int                                   # output tokens to force (max_tokens = min_tokens)
    hash_ids: list[int] = field(default_factory=list)   # prefix block ids, `block_size` tokens each
    block_size: int = MOONCAKE_BLOCK
    namespace: int = 0                         # hash ids of different sources never collide
    idx: int = -1                              # position in the run (assigned by `finalize`)
    source_row: int | None = None              # row of the source file (0-based data row)


# ---------------------------------------------------------------------------------------- readers

def _open_text(path: str):
    try:
        return open(path, "r", newline="", encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"trace file not found: {path}") from None
    except IsADirectoryError:
        raise TraceError(f"trace path is a directory, not a file: {path}") from None
    except PermissionError:
        raise TraceError(f"trace file is not readable (permission denied): {path}") from None
    except OSError as e:
        raise TraceError(f"cannot open trace file {path}: {e}") from None


def _parse_azure_ts(s: str) -> tuple[int, float]:
    """'2023-11-16 18:15:46.6805900' -> (day ordinal, seconds of the day); kept apart so that
    differences stay exact to the microsecond."""
    d, t = s.strip().split(" ", 1) if " " in s.strip() else s.strip().split("T", 1)
    y, mo, dd = (int(x) for x in d.split("-"))
    hh, mm, ss = t.split(":")
    return date(y, mo, dd).toordinal(), int(hh) * 3600 + int(mm) * 60 + float(ss)


def _default_class(path: str, fallback: str) -> str:
    base = os.path.basename(path).lower()
    for key in ("conv", "code"):
        if key in base:
            return key
    return fallback


def detect_format(path: str) -> str:
    """'azure' or 'jsonl', from the extension, else the first line."""
    low = path.lower()
    if low.endswith(".csv"):
        return "azure"
    if low.endswith(".jsonl") or low.endswith(".json"):
        return "jsonl"
    with _open_text(path) as f:
        try:
            first = f.readline().strip()
        except UnicodeDecodeError:
            raise TraceError(f"trace file is not UTF-8 text: {path}") from None
    if first.startswith("{"):
        return "jsonl"
    if "timestamp" in first.lower():
        return "azure"
    raise TraceError(f"cannot tell the format of trace {path}: expected an Azure CSV "
                     f"(TIMESTAMP,ContextTokens,GeneratedTokens) or JSONL (Mooncake) file")


def read_azure(path: str, cls: str | None = None, priority: str = "interactive") -> list[BenchRequest]:
    """Azure LLM inference trace 2023: TIMESTAMP,ContextTokens,GeneratedTokens (CRLF)."""
    cls = cls or _default_class(path, "azure")
    out: list[BenchRequest] = []
    with _open_text(path) as f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise TraceError(f"trace file is empty: {path}")
            cols = [h.strip().lower() for h in header]
            try:
                i_ts = cols.index("timestamp")
                i_in = cols.index("contexttokens")
                i_out = cols.index("generatedtokens")
            except ValueError:
                raise TraceError(f"{path}: not an Azure trace CSV; header is {header!r}, expected "
                                 f"TIMESTAMP,ContextTokens,GeneratedTokens") from None
            t0 = None
            for row_no, row in enumerate(reader):
                if not row or all(not c.strip() for c in row):
                    continue
                try:
                    ts = _parse_azure_ts(row[i_ts])
                    isl, osl = int(row[i_in]), int(row[i_out])
                except (ValueError, IndexError) as e:
                    raise TraceError(f"{path}:{row_no + 2}: bad row {row!r} ({e})") from None
                if t0 is None:
                    t0 = ts
                rel = (ts[0] - t0[0]) * 86400.0 + (ts[1] - t0[1])
                out.append(BenchRequest(arrival_s=rel, cls=cls, priority=priority, isl=isl,
                                        osl=osl, source_row=row_no))
        except UnicodeDecodeError:
            raise TraceError(f"trace file is not UTF-8 text: {path}") from None
    if not out:
        raise TraceError(f"trace file has no requests: {path}")
    return _sorted_rebased(out)


def read_jsonl(path: str, cls: str | None = None, priority: str = "interactive") -> list[BenchRequest]:
    """Mooncake JSONL ({timestamp ms, input_length, output_length, hash_ids}) or generic JSONL."""
    default_cls = cls or ("mooncake" if "mooncake" in os.path.basename(path).lower()
                          else _default_class(path, "trace"))
    out: list[BenchRequest] = []
    with _open_text(path) as f:
        try:
            for line_no, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    o = json.loads(line)
                    if "arrival_s" in o:
                        t = float(o["arrival_s"])
                    else:
                        t = float(o["timestamp"]) / 1000.0
                    isl = int(o["input_length"] if "input_length" in o else o["isl"])
                    osl = int(o["output_length"] if "output_length" in o else o["osl"])
                    hids = [int(h) for h in o.get("hash_ids", [])]
                    bs = int(o.get("block_size", MOONCAKE_BLOCK))
                except (ValueError, KeyError, TypeError) as e:
                    raise TraceError(f"{path}:{line_no + 1}: bad record ({type(e).__name__}: {e}); "
                                     f"expected timestamp (ms) or arrival_s, input_length, "
                                     f"output_length[, hash_ids]") from None
                if not isinstance(o, dict):
                    raise TraceError(f"{path}:{line_no + 1}: expected a JSON object")
                out.append(BenchRequest(
                    arrival_s=t, cls=cls or str(o.get("class", default_cls)),
                    priority=str(o.get("priority", priority)), isl=isl, osl=osl, hash_ids=hids,
                    block_size=bs, source_row=line_no))
        except UnicodeDecodeError:
            raise TraceError(f"trace file is not UTF-8 text: {path}") from None
    if not out:
        raise TraceError(f"trace file has no requests: {path}")
    return _sorted_rebased(out)


def read_trace(path: str, fmt: str = "auto", cls: str | None = None,
               priority: str = "interactive") -> list[BenchRequest]:
    if priority not in PRIORITIES:
        raise TraceError(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("azure", "csv"):
        return read_azure(path, cls, priority)
    if fmt in ("jsonl", "mooncake"):
        return read_jsonl(path, cls, priority)
    raise TraceError(f"unknown trace format {fmt!r}; expected azure, mooncake or jsonl")


def parse_trace_spec(spec: str) -> tuple[str, str | None, str]:
    """'FILE', 'FILE#CLASS' or 'FILE#CLASS:PRIORITY' -> (path, class, priority)."""
    if "#" in spec and not os.path.exists(spec):
        path, tail = spec.rsplit("#", 1)
        cls, _, prio = tail.partition(":")
        return path, (cls or None), (prio or "interactive")
    return spec, None, "interactive"


def _sorted_rebased(reqs: list[BenchRequest]) -> list[BenchRequest]:
    reqs.sort(key=lambda r: r.arrival_s)
    t0 = reqs[0].arrival_s
    if t0:
        for r in reqs:
            r.arrival_s -= t0
    return reqs


# ---------------------------------------------------------------------------------- transforms

def cap_lengths(r: BenchRequest, max_isl: int | None, max_osl: int | None,
                min_isl: int = 1) -> BenchRequest:
    """Cap ISL/OSL; hash ids are cut to the blocks that remain, so shared prefixes stay shared."""
    isl, osl, hids = r.isl, r.osl, r.hash_ids
    if max_isl is not None and isl > max_isl:
        isl = max_isl
    isl = max(isl, min_isl)
    if max_osl is not None and osl > max_osl:
        osl = max_osl
    osl = max(osl, 1)
    if hids:
        hids = hids[:max(1, math.ceil(isl / r.block_size))]
    return replace(r, isl=isl, osl=osl, hash_ids=list(hids))


def classify_by_shape(r: BenchRequest, ratio: float = 4.0) -> BenchRequest:
    """Prefill-heavy rows (isl >= ratio * osl) become 'summarize'/batch, the rest 'chat'/interactive."""
    if r.isl >= ratio * r.osl:
        return replace(r, cls="summarize", priority="batch")
    return replace(r, cls="chat", priority="interactive")


def prepare_trace(reqs: list[BenchRequest], *, start_s: float = 0.0, jitter_s: float = 0.0,
                  time_scale: float = 1.0, duration_s: float | None = None,
                  max_requests: int | None = None, max_isl: int | None = None,
                  max_osl: int | None = None, classify: str = "none", shape_ratio: float = 4.0,
                  seed: int = 0) -> list[BenchRequest]:
    """Cut and transform a trace read by `read_trace`.

    start_s: skip rows before this trace time (then rebase to 0); jitter_s: add U[0, jitter_s)
    trace seconds to each arrival (Mooncake arrivals come in ~3 s ticks); time_scale: multiply
    arrival times (0.5 = replay twice as fast); duration_s: keep arrivals before this many
    *scaled* seconds; max_requests: keep the first N; then lengths are capped.
    """
    if time_scale <= 0:
        raise TraceError(f"--time-scale must be > 0, got {time_scale}")
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for r in reqs:
        if r.arrival_s < start_s:
            continue
        t = r.arrival_s - start_s
        if jitter_s > 0:
            t += rng.random() * jitter_s
        out.append(replace(r, arrival_s=t))
    out.sort(key=lambda r: r.arrival_s)
    res: list[BenchRequest] = []
    for r in out:
        t = r.arrival_s * time_scale
        if duration_s is not None and t >= duration_s:
            break
        if max_requests is not None and len(res) >= max_requests:
            break
        r = cap_lengths(replace(r, arrival_s=t), max_isl, max_osl)
        if classify == "shape":
            r = classify_by_shape(r, shape_ratio)
        res.append(r)
    return res


def merge(*sources: list[BenchRequest]) -> list[BenchRequest]:
    """Merge several request lists (e.g. two traces as two classes); hash ids stay per source."""
    out: list[BenchRequest] = []
    for ns, src in enumerate(sources):
        out.extend(replace(r, namespace=ns) for r in src)
    out.sort(key=lambda r: r.arrival_s)
    return out


def finalize(reqs: list[BenchRequest]) -> list[BenchRequest]:
    """Sort by arrival and number requests 0..n-1 (the idx seeds each request's unique prompt)."""
    reqs = sorted(reqs, key=lambda r: r.arrival_s)
    for i, r in enumerate(reqs):
        r.idx = i
    return reqs


def retime(reqs: list[BenchRequest], arrivals: list[float]) -> list[BenchRequest]:
    """Replace arrival times (e.g. Poisson at --rate), keeping order and shapes."""
    return [replace(r, arrival_s=t) for r, t in zip(reqs, arrivals)]
