"""A tiny discrete-time model of a disaggregated cluster, only for planner tests.

Not the simulator (that is tandem/sim): requests are fluid-ish (each tick a worker prefills
`capacity x dt` tokens from its queue; decode workers advance every running request by
dt / step_time(batch, context) tokens), flips take `role_flip_s`, nothing is ever lost. It
produces `ClusterView`s through `WindowStats`, like the server would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.planner.capacity import PerfProfile
from tandem.planner.types import Decision, WorkerView
from tandem.planner.window import WindowStats


@dataclass
class Req:
    rid: int
    cls: str
    isl: int
    osl: int
    arrival: float
    left_prefill: float = 0.0
    generated: float = 0.0
    first_token: float | None = None


@dataclass
class W:
    wid: str
    role: str
    since: float = 0.0
    state: str = "active"
    target: str | None = None
    ready_at: float = 0.0
    queue: list = field(default_factory=list)     # prefill queue
    running: list = field(default_factory=list)   # decodes
    last_step: float = 0.0
    pf_tokens: float = 0.0
    dc_tokens: float = 0.0


class ToyCluster:
    def __init__(self, profile: PerfProfile, n_prefill: int, n_decode: int, window_s: float = 2.0,
                 dt: float = 1.0) -> None:
        self.p = profile
        self.dt = dt
        self.now = 0.0
        self.ws = [W(f"p{i}", "prefill") for i in range(n_prefill)] + \
                  [W(f"d{i}", "decode") for i in range(n_decode)]
        self.win = WindowStats(window_s)
        self._frac = 0.0
        self._rid = 0
        self.completed: dict[int, Req] = {}
        self.errors = 0
        self.flip_log: list[tuple[float, str, str]] = []

    # ------------------------------------------------------------------- workload + routing
    def arrive(self, rate: float, isl: int, osl: int, cls: str) -> None:
        self._frac += rate * self.dt
        n = int(self._frac)
        self._frac -= n
        for i in range(n):
            r = Req(self._rid, cls, isl, osl, self.now + i * self.dt / max(n, 1), left_prefill=isl)
            self._rid += 1
            self.win.on_arrival(r.arrival, cls, isl)
            pool = [w for w in self.ws if w.role == "prefill" and w.state == "active"]
            if not pool:
                pool = [w for w in self.ws if w.role == "decode" and w.state == "active"]
                tgt = min(pool, key=lambda w: len(w.running))
                tgt.running.append(r)     # prefill locally (rare in tests)
                r.left_prefill = 0
                r.first_token = r.arrival + self.p.prefill_time(isl)
                continue
            tgt = min(pool, key=lambda w: sum(x.left_prefill for x in w.queue))
            tgt.queue.append(r)

    def _to_decode(self, r: Req, exclude: W | None = None) -> None:
        pool = [w for w in self.ws if w.role == "decode" and w.state == "active" and w is not exclude]
        if not pool:
            pool = [w for w in self.ws if w.role == "decode" and w is not exclude] or \
                   [w for w in self.ws if w is not exclude]
        tgt = min(pool, key=lambda w: len(w.running))
        tgt.running.append(r)

    # ----------------------------------------------------------------------------- stepping
    def step(self) -> None:
        dt, now = self.dt, self.now
        cap = self.p.prefill_capacity_tps(2048)
        for w in self.ws:
            w.pf_tokens = w.dc_tokens = 0.0
            if w.state == "flipping" and now >= w.ready_at:
                w.role, w.state, w.since, w.target = w.target, "active", now, None
            if w.role == "prefill" and w.state in ("active", "flipping"):
                budget = cap * dt
                while w.queue and budget > 0:
                    r = w.queue[0]
                    use = min(budget, r.left_prefill)
                    r.left_prefill -= use
                    budget -= use
                    w.pf_tokens += use
                    if r.left_prefill <= 1e-9:
                        w.queue.pop(0)
                        t_done = now + (cap * dt - budget) / cap
                        r.first_token = t_done
                        self.win.on_first_token(t_done, r.cls, t_done - r.arrival)
                        r.generated = 1
                        self._to_decode(r)
            elif w.role == "decode":
                if w.running:
                    ctx = sum(r.isl + r.generated for r in w.running) / len(w.running)
                    st = self.p.decode_step_time(len(w.running), ctx)
                    w.last_step = st
                    toks = dt / st
                    keep = []
                    for r in w.running:
                        r.generated += toks
                        w.dc_tokens += toks
                        self.win.on_tokens(now, r.cls, toks)
                        if r.generated >= r.osl:
                            if r.rid in self.completed:
                                self.errors += 1
                            self.completed[r.rid] = r
                            self.win.on_finish(now + dt, r.cls, r.osl, st)
                        else:
                            keep.append(r)
                    w.running = keep
        self.now += dt

    def apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if d.action != "flip":
                continue
            w = next(x for x in self.ws if x.wid == d.worker_id)
            assert w.state == "active" and w.role == d.from_role, (w, d)
            self.flip_log.append((self.now, w.wid, d.to_role))
            w.state, w.target, w.ready_at = "flipping", d.to_role, self.now + self.p.role_flip_s
            if d.from_role == "prefill":      # re-route queued prefills
                q, w.queue = w.queue, []
                for r in q:
                    pool = [x for x in self.ws if x.role == "prefill" and x.state == "active"]
                    (min(pool, key=lambda x: len(x.queue)).queue if pool else w.queue).append(r)
            else:                             # migrate decodes
                run, w.running = w.running, []
                for r in run:
                    self._to_decode(r, exclude=w)

    # -------------------------------------------------------------------------------- views
    def views(self) -> list[WorkerView]:
        out = []
        for w in self.ws:
            kv = sum(r.isl + r.generated for r in w.running)
            out.append(WorkerView(
                worker_id=w.wid, role=w.role, state=w.state, since=w.since, target_role=w.target,
                waiting_prefill_tokens=sum(r.left_prefill for r in w.queue),
                num_waiting=len(w.queue), num_running=len(w.running),
                kv_usage=min(1.0, kv / max(self.p.kv_capacity_tokens, 1)),
                kv_capacity_tokens=self.p.kv_capacity_tokens, step_time_s=w.last_step,
                prefill_tokens_per_s=w.pf_tokens / self.dt, decode_tokens_per_s=w.dc_tokens / self.dt))
        return out

    def view(self):
        return self.win.view(self.now, self.views())

    def split(self) -> tuple[int, int]:
        eff = [(w.target if w.state == "flipping" else w.role) for w in self.ws]
        return eff.count("prefill"), eff.count("decode")

    def in_flight(self) -> int:
        return sum(len(w.queue) + len(w.running) for w in self.ws)


def run(cluster: ToyCluster, policy, phases: list[tuple[float, float, int, int, str]],
        record=None) -> list[Decision]:
    """Drive `policy.tick` through phases (duration_s, rate, isl, osl, cls)."""
    out: list[Decision] = []
    for dur, rate, isl, osl, cls in phases:
        for _ in range(int(math.ceil(dur / cluster.dt))):
            cluster.arrive(rate, isl, osl, cls)
            cluster.step()
            ds = policy.tick(cluster.view())
            cluster.apply(ds)
            out += ds
            if record is not None:
                record.append((cluster.now, *cluster.split()))
    return out
