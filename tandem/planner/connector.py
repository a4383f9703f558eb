"""How the planner acts on the world: the `Connector` interface, an in-memory connector for tests
and dry runs, and `PlannerLoop`, the asyncio driver the server uses.

Connector contract (one interface for the simulator, the local runtime and, later, Ray):

* Every method *requests* an action and returns promptly. It may be a plain function (the
  simulator: it schedules events in virtual time) or a coroutine function (the server: it sends a
  message to a worker process and awaits the acknowledgement). `PlannerLoop` awaits whatever is
  awaitable.
* Completion is observed, not returned: a flipped worker shows ``state="flipping"`` with
  ``target_role`` set until it is ``"active"`` in its new role; a started worker shows
  ``"starting"`` then ``"active"``; a stopped one ``"draining"`` then ``"stopped"`` (or leaves the
  list). The planner counts in-flight changes toward their target, so it never asks twice.
* ``flip(worker_id, role)``: stop admitting work of the old role. prefill -> decode once queued
  prefills finish (or are re-routed); decode -> prefill after migrating in-flight decodes' KV to
  other decode workers (or letting them finish within a bound). No weight reload, nothing lost.
* ``start_worker(role)`` returns the new worker's id (or None when it cannot start one).
* ``stop_worker(worker_id, graceful=True)``: drain, then stop. ``graceful=False`` drops in-flight
  requests (only the Dynamo-like baseline asks for that, to model Dynamo's scale-down).
* ``workers()`` returns the `WorkerView` list (the loop's ``get_view`` usually wraps it with the
  window metrics into a `ClusterView`).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable, Optional, Protocol, Union, runtime_checkable

from tandem.planner.types import ClusterView, Decision, WorkerId, WorkerView, jsonable

log = logging.getLogger("tandem.planner")

MaybeAwaitable = Union[Any, Awaitable[Any]]


@runtime_checkable
class Connector(Protocol):
    def workers(self) -> MaybeAwaitable: ...
    def flip(self, worker_id: WorkerId, role: str) -> MaybeAwaitable: ...
    def start_worker(self, role: str) -> MaybeAwaitable: ...
    def stop_worker(self, worker_id: WorkerId, graceful: bool = True) -> MaybeAwaitable: ...


class TickPolicy(Protocol):
    """What PlannerLoop drives: `Planner` and `DynamoBaseline` both fit."""
    def tick(self, view: ClusterView) -> list[Decision]: ...


def apply_decision(d: Decision, connector: Any) -> MaybeAwaitable:
    if d.action == "flip":
        return connector.flip(d.worker_id, d.to_role)
    if d.action == "start":
        return connector.start_worker(d.to_role)
    if d.action == "stop":
        try:
            return connector.stop_worker(d.worker_id, graceful=d.graceful)
        except TypeError:  # a connector without the graceful keyword
            return connector.stop_worker(d.worker_id)
    return None


async def apply_decisions(decisions: list[Decision], connector: Any) -> list[Any]:
    out = []
    for d in decisions:
        r = apply_decision(d, connector)
        if inspect.isawaitable(r):
            r = await r
        out.append(r)
    return out


class InMemoryConnector:
    """A connector over an in-memory worker table, for tests and dry runs (sync methods).

    Changes complete after the given delays when `advance(now)` is called with the current time.
    """

    def __init__(self, workers: list[WorkerView], role_flip_s: float = 1.0,
                 worker_start_s: float = 30.0, now: float = 0.0) -> None:
        self._w: dict[str, WorkerView] = {str(w.worker_id): w for w in workers}
        self.role_flip_s, self.worker_start_s = role_flip_s, worker_start_s
        self.now = now
        self._due: list[tuple[float, str, str]] = []     # (time, worker id, final state/role)
        self.calls: list[tuple] = []
        self._next_id = len(workers)

    def workers(self) -> list[WorkerView]:
        return [w for w in self._w.values() if w.state != "stopped"]

    def flip(self, worker_id: WorkerId, role: str) -> None:
        self.calls.append(("flip", worker_id, role))
        w = self._w[str(worker_id)]
        w.state, w.target_role = "flipping", role
        self._due.append((self.now + self.role_flip_s, str(worker_id), role))

    def start_worker(self, role: str) -> str:
        wid = f"w{self._next_id}"
        self._next_id += 1
        self.calls.append(("start", wid, role))
        self._w[wid] = WorkerView(worker_id=wid, role=role, state="starting", since=self.now)
        self._due.append((self.now + self.worker_start_s, wid, role))
        return wid

    def stop_worker(self, worker_id: WorkerId, graceful: bool = True) -> None:
        self.calls.append(("stop", worker_id, graceful))
        w = self._w[str(worker_id)]
        w.state = "draining"
        self._due.append((self.now, str(worker_id), "stopped"))

    def advance(self, now: float) -> None:
        self.now = now
        keep = []
        for t, wid, what in self._due:
            if t > now:
                keep.append((t, wid, what))
                continue
            w = self._w[wid]
            if what == "stopped":
                w.state = "stopped"
            else:
                w.role, w.state, w.target_role, w.since = what, "active", None, t
        self._due = keep


class PlannerLoop:
    """Drive a planner from asyncio: tick on a fixed cadence, apply decisions, keep history.

    ``get_view(now)`` builds the `ClusterView` (sync or async); ``now`` is the loop's clock
    (`time.monotonic` unless given). Decisions are logged at INFO with their reasons; a tick that
    changes nothing logs nothing. Errors in one tick are logged and kept, never fatal.
    """

    def __init__(self, planner: TickPolicy, connector: Any = None,
                 get_view: Optional[Callable[[float], Any]] = None, *,
                 tick_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 history: int = 200) -> None:
        self.planner = planner
        self.connector = connector
        self.get_view = get_view
        cfg = getattr(planner, "cfg", None)
        self.tick_s = max(0.25, float(tick_s or getattr(cfg, "tick_s", 1.0) or 1.0))
        self.clock, self.sleep = clock, sleep
        self.decisions: deque[Decision] = deque(maxlen=history)
        self.errors: deque[dict] = deque(maxlen=50)
        self.ticks = 0
        self.last_tick_s = 0.0
        self.running = False

    async def step(self, now: Optional[float] = None) -> list[Decision]:
        """One tick: view -> decisions -> connector. Returns the decisions."""
        now = self.clock() if now is None else now
        t0 = time.perf_counter()
        try:
            view = self.get_view(now) if self.get_view else await self._default_view(now)
            if inspect.isawaitable(view):
                view = await view
            decisions = self.planner.tick(view)
        except Exception as e:  # noqa: BLE001 - a bad tick must not stop the loop
            log.exception("planner tick failed")
            self.errors.append({"time": now, "error": f"{type(e).__name__}: {e}"})
            return []
        for d in decisions:
            self.decisions.append(d)
            log.info("planner: %s", d)
            if self.connector is None:
                continue
            try:
                r = apply_decision(d, self.connector)
                if inspect.isawaitable(r):
                    await r
            except Exception as e:  # noqa: BLE001
                log.exception("planner: applying %s failed", d)
                self.errors.append({"time": now, "decision": d.to_dict(),
                                    "error": f"{type(e).__name__}: {e}"})
        self.ticks += 1
        self.last_tick_s = time.perf_counter() - t0
        return decisions

    async def _default_view(self, now: float) -> ClusterView:
        ws = self.connector.workers() if self.connector is not None else []
        if inspect.isawaitable(ws):
            ws = await ws
        return ClusterView(now=now, workers=list(ws), window_s=self.tick_s)

    async def run(self, get_view: Optional[Callable[[float], Any]] = None,
                  connector: Any = None, stop: Optional[asyncio.Event] = None,
                  max_ticks: Optional[int] = None) -> None:
        """Tick every `tick_s` until `stop` is set (or `max_ticks` ticks). Missed ticks are
        skipped, not bunched."""
        if get_view is not None:
            self.get_view = get_view
        if connector is not None:
            self.connector = connector
        self.running = True
        start = self.clock()
        k = 0
        try:
            while not (stop is not None and stop.is_set()):
                await self.step()
                k += 1
                if max_ticks is not None and k >= max_ticks:
                    break
                now = self.clock()
                n = max(k, int((now - start) / self.tick_s) + 1)
                delay = start + n * self.tick_s - now
                if stop is not None:
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))
                    except asyncio.TimeoutError:
                        pass
                else:
                    await self.sleep(max(0.0, delay))
        finally:
            self.running = False

    def status(self) -> dict:
        """For /v1/cluster: the planner's status plus the loop's health."""
        st = self.planner.status() if hasattr(self.planner, "status") else {}
        st = dict(st)
        st["loop"] = {"tick_s": self.tick_s, "ticks": self.ticks, "running": self.running,
                      "last_tick_ms": round(self.last_tick_s * 1000, 3),
                      "errors": list(self.errors)}
        return jsonable(st)
