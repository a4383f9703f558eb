"""The planner inside `tandem serve`: a local connector over the worker client, the window metrics it
reads, and the asyncio loop that ticks it. (The planner itself lives in tandem.planner and never
sees HTTP or torch.)"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from tandem.planner.connector import PlannerLoop
from tandem.planner.planner import Planner
from tandem.planner.types import PlannerConfig, WorkerView
from tandem.planner.window import WindowStats

log = logging.getLogger("tandem.frontend.planning")


class LocalConnector:
    """Flips roles of the running worker processes in place (SetRole; no weight reload). A flip is
    `flipping` until the worker's status reports the new role, and then `active` with `since` reset.

    With `spawn` (role -> new worker id, or None when no GPU is free: how the runtime starts a worker
    process) and `terminate` (worker id -> None: ends the process; blocking, run in a thread) it also
    starts and stops workers. A started worker is `starting` until its Ready. A stop drains first:
    nothing new is routed to the worker, its decodes move to other decode workers with their KV (a
    flip to prefill migrates them), its held prefills are fetched; then the process is told to exit
    and terminated. A worker still busy after `drain_timeout_s` is treated as dead (requests not yet
    streamed are retried elsewhere) — only then can a stop cost a request."""

    def __init__(self, client, flip_timeout_s: float = 30.0, spawn=None, terminate=None,
                 drain_timeout_s: float = 120.0):
        self.client = client
        self.flip_timeout_s = flip_timeout_s
        self.spawn, self.terminate, self.drain_timeout_s = spawn, terminate, drain_timeout_s
        self.pending: dict[str, tuple[str, float]] = {}        # worker -> (target role, issued at)
        self.since: dict[str, float] = {}
        self.flips_done: deque[dict] = deque(maxlen=200)
        self.started: dict[str, float] = {}                    # spawned, Ready not seen yet
        self.scaling: deque[dict] = deque(maxlen=100)          # starts and stops, for /v1/cluster
        self._tasks: set[asyncio.Task] = set()

    def workers(self) -> list[WorkerView]:
        now = time.monotonic()
        out = []
        for wid, t0 in list(self.started.items()):
            w = self.client.workers.get(wid)
            if w is None or w.state != "starting":
                del self.started[wid]
                self._log("started" if w is not None and w.alive else "start failed", wid,
                          seconds=round(now - t0, 3), error=None if w is None else w.error)
        for w in self.client.workers.values():
            if w.state == "starting":          # spawned, or still loading at start-up: counts as coming
                out.append(WorkerView(worker_id=w.worker_id, role=w.role, state="starting",
                                      since=self.started.get(w.worker_id, now)))
                continue
            if not w.alive:
                continue
            s = w.stats or {}
            if w.state == "draining":
                out.append(self._view(w, "draining", None))
                continue
            state, target = "active", None
            if w.worker_id in self.pending:
                role, t0 = self.pending[w.worker_id]
                if w.role == role:
                    del self.pending[w.worker_id]
                    self.since[w.worker_id] = now
                    # seconds: SetRole sent -> the frontend saw the new role (what the planner waits for);
                    # worker: the worker's own record of the flip (flip_s, drain_s), monotonic clock
                    self.flips_done.append({"worker": w.worker_id, "role": role, "issued_at": round(t0, 6),
                                            "seen_at": round(now, 6), "seconds": round(now - t0, 3),
                                            "worker_flip": s.get("last_flip")})
                elif now - t0 > self.flip_timeout_s:
                    log.warning("flip of %s to %s timed out", w.worker_id, role)
                    del self.pending[w.worker_id]
                else:
                    state, target = "flipping", role
            out.append(self._view(w, state, target))
        return out

    def _view(self, w, state: str, target) -> WorkerView:
        s = w.stats or {}
        return WorkerView(
            worker_id=w.worker_id, role=w.role, state=state, target_role=target,
            since=self.since.get(w.worker_id, w.ready_at),
            waiting_prefill_tokens=float(s.get("waiting_prefill_tokens", 0) or 0),
            num_waiting=int(sum((s.get("num_waiting") or {}).values())),
            num_running=int(s.get("num_running", 0) or 0), kv_usage=float(s.get("kv_usage", 0) or 0),
            kv_capacity_tokens=int(s.get("kv_blocks_total", 0) or 0) * int(w.block_size or 16),
            step_time_s=float(s.get("last_step_s", 0) or 0))

    def _log(self, what: str, worker_id: str, **kw) -> None:
        self.scaling.append({"time": round(time.monotonic(), 3), "event": what, "worker": worker_id, **kw})

    def flip(self, worker_id: str, role: str) -> None:
        self.pending[worker_id] = (role, time.monotonic())
        self.client.set_role(worker_id, role)

    def start_worker(self, role: str):
        if self.spawn is None:
            log.warning("planner asked to start a %s worker; this server cannot start workers", role)
            return None
        wid = self.spawn(role)
        if wid is None:
            log.warning("planner asked to start a %s worker; none can start (no free GPU)", role)
            return None
        self.started[wid] = time.monotonic()
        self._log("start", wid, role=role)
        return wid

    def stop_worker(self, worker_id: str, graceful: bool = True):
        """Drain, then stop (see the class docstring). `graceful=False` only shortens the drain."""
        w = self.client.workers.get(worker_id)
        if self.terminate is None:
            log.warning("planner asked to stop %s; this server cannot stop workers", worker_id)
            return None
        if w is None or not w.alive or w.state == "draining":
            return None
        self.client.drain(worker_id)
        self.pending.pop(worker_id, None)
        if w.role != "prefill" and self.client.alive_workers(("decode", "both")):
            self.client.set_role(worker_id, "prefill")          # its decodes move out with their KV
        self._log("drain", worker_id, role=w.role)
        t = asyncio.get_running_loop().create_task(
            self._stop_when_drained(worker_id, self.drain_timeout_s if graceful else 5.0),
            name=f"tandem-stop-{worker_id}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return None

    async def _stop_when_drained(self, worker_id: str, timeout_s: float) -> None:
        t0 = time.monotonic()
        idle_checks = 0
        while idle_checks < 3:                 # three quiet checks: statuses lag by one interval
            await asyncio.sleep(0.1)
            if worker_id not in self.client.workers or not self.client.workers[worker_id].alive:
                return                         # died meanwhile: the client already handled it
            idle_checks = idle_checks + 1 if self.client.worker_busy(worker_id) == 0 else 0
            if time.monotonic() - t0 > timeout_s:
                log.warning("worker %s still busy after %.0fs of draining; stopping it", worker_id, timeout_s)
                self.client._mark_dead(worker_id, "stopped by the planner before it drained")
                break
        else:
            self.client.retire(worker_id)
        drain_s = round(time.monotonic() - t0, 3)
        try:
            await asyncio.to_thread(self.terminate, worker_id)
        except Exception:  # noqa: BLE001 - the runtime's shutdown still reaps it
            log.exception("could not terminate worker %s", worker_id)
        self._log("stopped", worker_id, drain_s=drain_s, stop_s=round(time.monotonic() - t0, 3))


class ServerPlanner:
    """Owns the window stats (fed by the API), the planner, the connector and the loop task."""

    def __init__(self, client, profile, config: PlannerConfig, window_s: float = 5.0, spawn=None,
                 terminate=None):
        self.window = WindowStats(window_s, config.slo_ttft_ms, config.slo_tpot_ms)
        self.planner = Planner(config, profile)
        self.connector = LocalConnector(client, spawn=spawn, terminate=terminate)
        self.loop = PlannerLoop(self.planner, self.connector,
                                lambda now: self.window.view(now, self.connector.workers()), tick_s=config.tick_s)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop.run(), name="tandem-planner")

    def snapshot(self) -> dict:
        return {"enabled": True, "status": self.planner.status(), "flips": dict(self.planner.flips),
                "completed_flips": list(self.connector.flips_done)[-50:],
                "scaling": list(self.connector.scaling),
                "decisions": [d.to_dict() for d in list(self.loop.decisions)[-50:]],
                "last_inputs": self.planner.last_inputs, "ticks": self.loop.ticks,
                "errors": list(self.loop.errors)[-5:]}
