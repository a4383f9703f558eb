"""The planner inside `tandem serve`: a local connector over the worker client, the window metrics it
reads, and the asyncio loop that ticks it. (The planner itself lives in tandem.planner and never
sees HTTP or torch.)"""
from __future__ import annotations

import asyncio
import logging
import time

from tandem.planner.connector import PlannerLoop
from tandem.planner.planner import Planner
from tandem.planner.types import PlannerConfig, WorkerView
from tandem.planner.window import WindowStats

log = logging.getLogger("tandem.frontend.planning")


class LocalConnector:
    """Flips roles of the running worker processes in place (SetRole; no weight reload). A flip is
    `flipping` until the worker's status reports the new role, and then `active` with `since` reset."""

    def __init__(self, client, flip_timeout_s: float = 30.0):
        self.client = client
        self.flip_timeout_s = flip_timeout_s
        self.pending: dict[str, tuple[str, float]] = {}        # worker -> (target role, issued at)
        self.since: dict[str, float] = {}
        self.flips_done: list[dict] = []

    def workers(self) -> list[WorkerView]:
        now = time.monotonic()
        out = []
        for w in self.client.alive_workers():
            s = w.stats or {}
            state, target = "active", None
            if w.worker_id in self.pending:
                role, t0 = self.pending[w.worker_id]
                if w.role == role:
                    del self.pending[w.worker_id]
                    self.since[w.worker_id] = now
                    self.flips_done.append({"worker": w.worker_id, "role": role, "seconds": round(now - t0, 3)})
                elif now - t0 > self.flip_timeout_s:
                    log.warning("flip of %s to %s timed out", w.worker_id, role)
                    del self.pending[w.worker_id]
                else:
                    state, target = "flipping", role
            out.append(WorkerView(
                worker_id=w.worker_id, role=w.role, state=state, target_role=target,
                since=self.since.get(w.worker_id, w.ready_at),
                waiting_prefill_tokens=float(s.get("waiting_prefill_tokens", 0) or 0),
                num_waiting=int(sum((s.get("num_waiting") or {}).values())),
                num_running=int(s.get("num_running", 0) or 0), kv_usage=float(s.get("kv_usage", 0) or 0),
                kv_capacity_tokens=int(s.get("kv_blocks_total", 0) or 0) * int(w.block_size or 16),
                step_time_s=float(s.get("last_step_s", 0) or 0)))
        return out

    def flip(self, worker_id: str, role: str) -> None:
        self.pending[worker_id] = (role, time.monotonic())
        self.client.set_role(worker_id, role)

    def start_worker(self, role: str):
        log.warning("planner asked to start a %s worker; the local connector flips roles only", role)
        return None

    def stop_worker(self, worker_id: str, graceful: bool = True):
        log.warning("planner asked to stop %s; the local connector flips roles only", worker_id)
        return None


class ServerPlanner:
    """Owns the window stats (fed by the API), the planner, the connector and the loop task."""

    def __init__(self, client, profile, config: PlannerConfig, window_s: float = 5.0):
        self.window = WindowStats(window_s)
        self.planner = Planner(config, profile)
        self.connector = LocalConnector(client)
        self.loop = PlannerLoop(self.planner, self.connector,
                                lambda now: self.window.view(now, self.connector.workers()), tick_s=config.tick_s)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop.run(), name="tandem-planner")

    def snapshot(self) -> dict:
        return {"enabled": True, "status": self.planner.status(), "flips": dict(self.planner.flips),
                "completed_flips": self.connector.flips_done[-50:],
                "decisions": [d.to_dict() for d in list(self.loop.decisions)[-50:]],
                "last_inputs": self.planner.last_inputs, "ticks": self.loop.ticks,
                "errors": list(self.loop.errors)[-5:]}
