"""Sliding-window request metrics -> `ClusterView`. For whoever feeds the planner (server, sim).

Record request events as they happen, then ask for a view::

    win = WindowStats(window_s=5.0)
    win.on_arrival(t, "interactive", prompt_tokens=812, cached_tokens=512)
    win.on_first_token(t, "interactive", ttft_s=0.21, queue_wait_s=0.05)
    win.on_tokens(t, "interactive", 1)                  # tokens generated (any granularity)
    win.on_finish(t, "interactive", output_tokens=230, tpot_s=0.031)
    # with slo_ttft_ms / slo_tpot_ms given, each class also counts its first tokens and finishes
    # over those SLOs (the planner weighs flap damping with them)
    view = win.view(now, workers)                      # ClusterView over [now - window_s, now]

Pure Python, no clock of its own, O(events in the window) per view.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Optional

from tandem.planner.types import ClassStats, ClusterView, WorkerView, nonneg


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear-interpolation percentile (numpy's default), None for no values."""
    vs = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not vs:
        return None
    if len(vs) == 1:
        return float(vs[0])
    pos = (len(vs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(vs) - 1)
    return float(vs[lo] + (vs[hi] - vs[lo]) * (pos - lo))


class WindowStats:
    def __init__(self, window_s: float = 5.0, slo_ttft_ms: Optional[float] = None,
                 slo_tpot_ms: Optional[float] = None) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self.window_s = float(window_s)
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms     # for the SLO miss counts
        self._arr: dict[str, deque] = defaultdict(deque)      # (t, prompt, uncached)
        self._first: dict[str, deque] = defaultdict(deque)    # (t, ttft_s)
        self._fin: dict[str, deque] = defaultdict(deque)      # (t, output_tokens, tpot_s|None)
        self._tok: dict[str, deque] = defaultdict(deque)      # (t, n)
        self._wait: deque = deque()                            # (t, queue wait s)

    # --------------------------------------------------------------------------- recording
    def on_arrival(self, t: float, cls: str, prompt_tokens: float, cached_tokens: float = 0.0) -> None:
        p = nonneg(prompt_tokens)
        self._arr[cls].append((t, p, max(0.0, p - nonneg(cached_tokens))))

    def on_first_token(self, t: float, cls: str, ttft_s: float,
                       queue_wait_s: Optional[float] = None) -> None:
        self._first[cls].append((t, nonneg(ttft_s)))
        if queue_wait_s is not None:
            self._wait.append((t, nonneg(queue_wait_s)))

    def on_tokens(self, t: float, cls: str, n: float = 1.0) -> None:
        self._tok[cls].append((t, nonneg(n)))

    def on_finish(self, t: float, cls: str, output_tokens: float,
                  tpot_s: Optional[float] = None) -> None:
        self._fin[cls].append((t, nonneg(output_tokens), None if tpot_s is None else nonneg(tpot_s)))

    # ------------------------------------------------------------------------------ queries
    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        for dd in (self._arr, self._first, self._fin, self._tok):
            for q in dd.values():
                while q and q[0][0] < cut:
                    q.popleft()
        while self._wait and self._wait[0][0] < cut:
            self._wait.popleft()

    def classes(self, now: float) -> dict[str, ClassStats]:
        self._prune(now)
        out: dict[str, ClassStats] = {}
        names = set(self._arr) | set(self._first) | set(self._fin) | set(self._tok)
        for c in sorted(names):
            arr, first, fin, tok = self._arr[c], self._first[c], self._fin[c], self._tok[c]
            ttfts = [x[1] * 1000 for x in first]
            tpots = [x[2] * 1000 for x in fin if x[2] is not None]
            events = misses = 0
            for slo, vals in ((self.slo_ttft_ms, ttfts), (self.slo_tpot_ms, tpots)):
                if slo:
                    events += len(vals)
                    misses += sum(1 for v in vals if v > slo)
            out[c] = ClassStats(
                arrivals=len(arr), prompt_tokens=sum(x[1] for x in arr),
                uncached_prompt_tokens=sum(x[2] for x in arr),
                isl_p90=percentile([x[1] for x in arr], 90),
                completions=len(fin), output_tokens=sum(x[1] for x in fin),
                osl_p90=percentile([x[1] for x in fin], 90),
                generated_tokens=sum(x[1] for x in tok),
                ttft_p50_ms=percentile(ttfts, 50), ttft_p90_ms=percentile(ttfts, 90),
                tpot_p50_ms=percentile(tpots, 50), tpot_p90_ms=percentile(tpots, 90),
                ttft_mean_ms=(sum(ttfts) / len(ttfts)) if ttfts else None,
                tpot_mean_ms=(sum(tpots) / len(tpots)) if tpots else None,
                slo_events=events, slo_misses=misses)
        return out

    def view(self, now: float, workers: list[WorkerView]) -> ClusterView:
        cls = self.classes(now)
        waits = [x[1] for x in self._wait]
        return ClusterView(now=now, workers=list(workers), window_s=self.window_s, classes=cls,
                           prefill_queue_wait_mean_s=(sum(waits) / len(waits)) if waits else None,
                           prefill_queue_wait_p90_s=percentile(waits, 90))
