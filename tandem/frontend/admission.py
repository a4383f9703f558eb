"""Admission control: bounded waiting room per priority class.

The cluster has `capacity` run slots (sum of the workers' max_num_seqs) and a waiting room of
`max_waiting` requests. A request of class p is admitted while the number of requests in flight
(running or queued, counted by this frontend) is below

    limit[p] = capacity + floor(max_waiting * share[p])      share: interactive 1.0, standard 0.5, batch 0.25

so as load rises batch requests are refused first, then standard, and interactive last. Refusals
raise `Overloaded` (HTTP 429) with a Retry-After estimated from the recent completion rate.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tandem.common.errors import Overloaded
from tandem.common.sampling import PRIORITIES

DEFAULT_SHARES = {"interactive": 1.0, "standard": 0.5, "batch": 0.25}
BASE_RETRY_S = {"interactive": 1.0, "standard": 2.0, "batch": 5.0}


@dataclass
class Ticket:
    priority: str
    released: bool = False


class AdmissionController:
    def __init__(self, capacity: int = 0, max_waiting: int = 1024, shares: dict[str, float] | None = None):
        self.capacity = int(capacity)
        self.max_waiting = int(max_waiting)
        self.shares = dict(shares or DEFAULT_SHARES)
        self.inflight = {p: 0 for p in PRIORITIES}
        self.rejected = {p: 0 for p in PRIORITIES}
        self._rate = 0.0           # completions/s, EWMA
        self._last_done = None

    @property
    def total_inflight(self) -> int:
        return sum(self.inflight.values())

    def limit(self, priority: str) -> int:
        return self.capacity + int(math.floor(self.max_waiting * self.shares.get(priority, 1.0)))

    def set_capacity(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))

    def retry_after(self, priority: str) -> int:
        over = self.total_inflight - self.limit(priority) + 1
        est = over / self._rate if self._rate > 0 else 0.0
        return int(min(60, max(BASE_RETRY_S.get(priority, 1.0), math.ceil(est))))

    def admit(self, priority: str) -> Ticket:
        if self.total_inflight >= self.limit(priority):
            self.rejected[priority] = self.rejected.get(priority, 0) + 1
            ra = self.retry_after(priority)
            raise Overloaded(f"server overloaded: {self.total_inflight} requests in flight, the limit for "
                             f"{priority!r} requests is {self.limit(priority)}; retry after {ra}s", retry_after=ra)
        self.inflight[priority] += 1
        return Ticket(priority)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.inflight[ticket.priority] -= 1
        now = time.monotonic()
        if self._last_done is not None:
            dt = max(now - self._last_done, 1e-3)
            self._rate = 0.9 * self._rate + 0.1 * (1.0 / dt)
        self._last_done = now

    def snapshot(self) -> dict:
        return {"capacity": self.capacity, "max_waiting": self.max_waiting,
                "limits": {p: self.limit(p) for p in PRIORITIES}, "inflight": dict(self.inflight),
                "rejected": dict(self.rejected)}
