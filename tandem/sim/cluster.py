"""Discrete-event simulation of a Tandem cluster in virtual time.

N `SimWorker`s (one `SimEngine` each, role prefill / decode / both) behind the real router
(`tandem.router.KvRouter`) and, optionally, the real planner (any object with `tick(view)` or
`tick(now, view)` returning `tandem.planner.types.Decision`s), driven by a request list from the
bench's trace readers / workloads.

Event loop: a heap of (time, seq, kind, obj, gen). Each worker has at most one live event, the end
of its current engine step (or decode-window checkpoint, see `tandem.engine.sim_engine`); a worker
with nothing to do has none and sleeps until work arrives. Arrivals are merged in from the sorted
request list (they never sit in the heap). Global ticks: status publication to the router (every
`publish_interval_s`, only workers whose state changed), timeline samples (every 1 s) and planner
ticks. Ties at equal times go by insertion order, so a run is deterministic for a given seed.

Request flow (what the frontend + workers do in the real system):
* aggregated (role both): router picks a worker in pool "both" -> the engine prefills and decodes.
* disaggregated: router picks a worker in pool "prefill" -> the engine prefills with max_tokens=1 and
  hold_kv -> the first token is streamed (TTFT) -> the router picks a decode worker -> the KV moves
  for `transfer_latency_s + bytes / bandwidth` (blocks the decode worker already caches are not sent)
  -> the decode engine continues with output_token_ids=[first token] and a KV import (the prompt is
  computed there) -> the prefill worker releases its blocks. Prompts with at most
  `local_prefill_tokens` uncached tokens skip the prefill pool and run on a decode worker.
  If the prefill pool is empty (all flipping), requests wait at the router.

Planner actions go through `SimConnector` (the `tandem.planner.connector.Connector` contract):
`flip(worker, role)`: the worker stops taking new work; decodes in flight on a decode worker are
migrated (KV transfer) to other decode workers when there are any, other work drains; then the flip
itself takes the profile's `role_flip_s`. `start_worker(role)`: ready after `worker_start_s`.
`stop_worker(worker, graceful)`: drain then stop (graceful=False fails the requests in flight).
GPU-hours count every worker from its start request to its stop.
"""
from __future__ import annotations

import gc
import heapq
import inspect
import math
import random
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

from tandem.common.errors import TandemError
from tandem.common.sampling import SamplingParams
from tandem.engine.sim_engine import IDLE, SIM_TOKEN, WINDOW, SimEngine, SimEngineConfig, SimKVExport
from tandem.router.disagg import DisaggPolicy
from tandem.sim.profile import SimProfile
from tandem.sim.stream import RecordColumns, sim_record_class

EV_WORKER, EV_XFER, EV_LIFE, EV_PUBLISH, EV_TIMELINE, EV_PLANNER, EV_CALL = range(7)
ROLES = ("prefill", "decode", "both")
_MASK = (1 << 62) - 1
_UNIQUE = 1 << 62


# ------------------------------------------------------------------------------------ config

@dataclass
class ClusterConfig:
    roles: list[str]                          # initial role of each worker
    router_mode: str = "kv"                   # kv | round-robin | least-loaded (tandem.router modes)
    publish_interval_s: float = 0.25          # worker status + KV events -> router
    timeline_interval_s: float = 1.0
    planner_tick_s: float = 1.0
    planner_window_s: float = 5.0
    transfer_gbps: float | None = None        # KV transfer bandwidth, GB/s (None: profile's copy bandwidth)
    transfer_latency_s: float = 0.001         # fixed cost per KV transfer
    local_prefill_tokens: int = 0             # disagg: prompts with <= this many uncached tokens prefill on the decode worker
    prefill_queue_factor: float = 0.0         # disagg: ... or when the prefill queue is this x longer (0: off)
    spill_batch: bool = False                 # that rule also moves batch prompts (tandem.router.disagg)
    request_overhead_s: float = 0.0           # frontend/network time before the router sees a request
    max_concurrency: int | None = None        # client-side cap on requests in flight (tandem bench's)
    stall_timeout_s: float = 600.0            # after the last arrival, give up on requests no worker can take
    token_times: str = "all"                  # all | none | every:K (keep per-token times of every K-th request)
    router_impl: str = "indexed"              # indexed (tandem.sim.fastrouter) | base (KvRouter as is)
    keep_records: bool = True                 # False: finished requests go to `columns` (bounded memory)
    seed: int = 0
    engine: SimEngineConfig = field(default_factory=SimEngineConfig)


# ------------------------------------------------------------------------------------ state

class SimReq:
    """One trace request as the frontend sees it."""
    __slots__ = ("br", "rid", "t_arr", "hashes", "times", "t_first", "t_last", "n_out", "status",
                 "error_kind", "error", "cached", "stage", "pw", "dw", "t_sched", "done", "lag")

    def __init__(self, br, rid: str, t_arr: float):
        self.br = br
        self.rid = rid
        self.t_arr = t_arr             # when the request reaches the router (send + overhead)
        self.lag = 0.0                 # client-side wait for a concurrency slot
        self.hashes: Any = None
        self.times: Any = None
        self.t_first: Any = None
        self.t_last: Any = None
        self.n_out = 0
        self.status = "ok"
        self.error_kind: Any = None
        self.error: Any = None
        self.cached = 0
        self.stage = "queued"          # queued | prefill | transfer | decode | done
        self.pw: Any = None                 # worker doing the prefill (disagg) or everything
        self.dw: Any = None                 # decode worker (disagg)
        self.t_sched: Any = None
        self.done = False


class SimWorker:
    __slots__ = ("idx", "name", "role", "state", "since", "target_role", "engine", "gen", "t_event",
                 "started_at", "stopped_at", "dirty", "pub_steps", "flip_pending", "stop_graceful",
                 "prev", "migrating")

    def __init__(self, idx: int, role: str, engine: SimEngine, now: float, state: str = "active"):
        self.idx = idx
        self.name = f"w{idx}"
        self.role = role
        self.state = state
        self.since = now
        self.target_role: Any = None
        self.engine = engine
        self.gen = 0
        self.t_event: Any = None
        self.started_at = now
        self.stopped_at: Any = None
        self.dirty = True
        self.pub_steps = -1
        self.flip_pending = False          # flip timer running (drained)
        self.stop_graceful = True
        self.prev = (now, 0, 0, 0, 0.0)    # planner window counters: t, steps, prompt, generated, busy
        self.migrating = 0

    @property
    def accepting(self) -> bool:
        return self.state == "active"


class _VirtualTime:
    """Stands in for the `time` module inside tandem.router while a simulation runs (the router
    reads time.monotonic() for its predicted-cache expiry)."""

    def __init__(self, cluster):
        self._c = cluster

    def monotonic(self) -> float:
        return self._c.now

    def time(self) -> float:
        return self._c.now

    def perf_counter(self) -> float:
        return self._c.now


@contextmanager
def _router_clock(cluster):
    try:
        import tandem.router.kv_router as kr
    except ImportError:
        yield
        return
    old = kr.time
    kr.time = _VirtualTime(cluster)
    try:
        yield
    finally:
        kr.time = old


def make_router(mode: str, seed: int, impl: str = "indexed", shared_prefixes: bool = True):
    """The real router: `tandem.router.KvRouter`, or its indexed subclass (same decisions, O(log W)
    per request; see tandem.sim.fastrouter)."""
    from tandem.router import KvRouter, RouterConfig
    cfg = RouterConfig(mode=mode.replace("_", "-"), seed=seed)
    if impl == "indexed":
        from tandem.sim.fastrouter import IndexedKvRouter
        return IndexedKvRouter(cfg, unique_from=_UNIQUE, index=shared_prefixes)
    return KvRouter(cfg)


def _set_alive(router, name: str, alive: bool) -> None:
    if hasattr(router, "set_alive"):
        router.set_alive(name, alive)
    elif name in router.workers:
        router.workers[name].alive = alive


from tandem.router.kv_router import NoWorkers


# ------------------------------------------------------------------------------------ the cluster

class SimCluster:
    def __init__(self, profile, config: ClusterConfig, requests: Any, planner=None):
        self.profile = SimProfile.coerce(profile)
        self.cfg = config
        self.requests = requests
        self.planner = planner
        self.block_size = config.engine.block_size
        self.now = 0.0
        self.heap: list = []
        self._seq = 0
        base = getattr(requests, "base", requests)     # a lazy ReplicatedRequests: its one copy
        self.router = make_router(config.router_mode, config.seed, config.router_impl,
                                  shared_prefixes=any(r.hash_ids for r in base))
        self.rng = random.Random(config.seed)
        self.workers: list[SimWorker] = []
        self.by_name: dict[str, SimWorker] = {}
        self.reqs: list[SimReq] = []
        self.columns = None if config.keep_records else RecordColumns()
        self.pending: deque = deque()            # requests waiting for a prefill/both worker
        self._t_last_arrival = 0.0
        self.client_queue: deque = deque()       # requests waiting for a client concurrency slot
        self.pending_decode: deque = deque()     # prefilled requests waiting for a decode worker
        self.sent = self.completed = self.failed = 0
        self.out_tokens = 0
        self.timeline: list[dict] = []
        self.decisions: list[dict] = []
        self.events = 0
        self._params: dict[int, SamplingParams] = {}
        self._first_params = SamplingParams(max_tokens=1, ignore_eos=True)
        self._xfer_gbps = config.transfer_gbps
        self._tl_busy = 0.0
        self._tl_t = 0.0
        mode = config.token_times
        self._times_every = 1 if mode == "all" else (0 if mode == "none" else int(mode.split(":")[1]))
        self.window: Any = None
        self.connector = SimConnector(self)
        self._disagg = False
        self._policy = DisaggPolicy(max(0, config.local_prefill_tokens), config.prefill_queue_factor, 0,
                                    config.spill_batch)
        self._local_rule = config.local_prefill_tokens > 0 or config.prefill_queue_factor > 0
        self.disagg_decisions: dict[str, int] = {}      # local prefills by reason (DisaggPolicy)
        for role in config.roles:
            self._new_worker(role, "active")
        self._roles_changed()
        if planner is not None:
            try:
                from tandem.planner.window import WindowStats
                pc = getattr(planner, "cfg", None)
                self.window = WindowStats(config.planner_window_s, getattr(pc, "slo_ttft_ms", None),
                                          getattr(pc, "slo_tpot_ms", None))
            except ImportError:
                self.window = None

    # ------------------------------------------------------------------ workers
    def _new_worker(self, role: str, state: str) -> SimWorker:
        if role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {role!r}")
        ecfg = SimEngineConfig(**{k: getattr(self.cfg.engine, k) for k in self.cfg.engine.__dataclass_fields__})
        eng = SimEngine(self.profile, ecfg, clock_start=self.now)
        w = SimWorker(len(self.workers), role, eng, self.now, state)
        eng.on_finish = lambda req, t, w=w: self._on_engine_finish(w, req, t)
        eng.on_first = lambda req, t, w=w: self._on_engine_first(w, req, t)
        self.workers.append(w)
        self.by_name[w.name] = w
        self._roles_changed()
        self.router.add_worker(w.name, role, eng.block_size, eng.kv.pool.num_blocks, ecfg.max_num_seqs)
        if state != "active":
            _set_alive(self.router, w.name, False)
        return w

    def _push(self, t: float, kind: int, obj, gen: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, obj, gen))

    def _resched(self, w: SimWorker) -> None:
        tn = w.engine.t_next
        if tn is None:
            if w.t_event is not None:
                w.gen += 1
                w.t_event = None
            return
        if tn != w.t_event:
            w.gen += 1
            w.t_event = tn
            self._seq += 1
            heapq.heappush(self.heap, (tn, self._seq, EV_WORKER, w, w.gen))

    def _touch(self, w: SimWorker) -> SimEngine:
        """Before changing a worker's engine at `now`."""
        e = w.engine
        if e.state == WINDOW and e.sync(self.now):
            self._resched(w)
        w.dirty = True
        return e

    def _kick(self, w: SimWorker) -> None:
        if w.engine.kick(self.now):
            self._resched(w)

    # ------------------------------------------------------------------ requests
    def _params_for(self, osl: int) -> SamplingParams:
        p = self._params.get(osl)
        if p is None:
            p = self._params[osl] = SamplingParams(max_tokens=osl, ignore_eos=True)
        return p

    def _hashes(self, br):
        """Chained block hashes of the request's whole sequence (prompt + output), synthetic.

        Blocks fully inside the part of the prompt built from the trace's `hash_ids` (as the bench's
        prompt builder does) hash (chain of trace blocks so far, position): equal prefixes give equal
        hashes. Every other block is unique to the request. A request without `hash_ids` gets a
        `range` (the same values; O(1), where a list made ~20 big ints a request, mostly unread)."""
        bs = self.block_size
        n = (br.isl + br.osl) // bs
        base = _UNIQUE + (br.idx << 24)
        if not br.hash_ids:
            return range(base, base + n)
        B = br.block_size
        ns = br.namespace
        chain = []
        c = ns
        for h in br.hash_ids:
            c = hash((c, ns, h)) & _MASK
            chain.append(c)
        shared = min(br.isl, len(br.hash_ids) * B) // bs
        out = [hash((chain[((j + 1) * bs - 1) // B], j)) & _MASK for j in range(shared)]
        out.extend(range(base + shared, base + n))
        return out

    def _arrive(self, br, t: float) -> None:
        sr = SimReq(br, f"r{br.idx}", t)
        if self.columns is None:
            self.reqs.append(sr)
        if self._times_every and br.idx % self._times_every == 0:
            sr.times = []
        cap = self.cfg.max_concurrency
        if cap is not None and self.sent - self.completed - self.failed >= cap:
            self.client_queue.append(sr)
            return
        self.sent += 1
        self._dispatch(sr)

    def _slot_freed(self) -> None:
        """A request ended: with a client concurrency cap, send the next one waiting for a slot."""
        if self.client_queue:
            sr = self.client_queue.popleft()
            ovh = self.cfg.request_overhead_s
            sr.lag = self.now - sr.br.arrival_s
            sr.t_arr = self.now + ovh
            self.sent += 1
            self._push(self.now + ovh, EV_CALL, (self._dispatch, (sr,)))

    def _dispatch(self, sr: SimReq) -> None:
        br = sr.br
        if sr.hashes is None:
            sr.hashes = self._hashes(br)
        phashes = sr.hashes[:br.isl // self.block_size]
        disagg = self._disagg
        pool = "prefill" if disagg else "both"
        if disagg and self._local_rule:
            try:
                dwid, dov = self.router.select(phashes, br.isl, "decode")
            except NoWorkers:
                dwid = None
            if dwid is not None:
                pol = self._policy
                uncached = br.isl - dov * self.block_size
                if self.cfg.local_prefill_tokens > 0 and pol.short(uncached):
                    self._count("local_short_uncached")
                    return self._start_on(sr, self.by_name[dwid], phashes, dov, full=True)
                try:
                    reason, pick = pol.queue_reason(self.router, phashes, br.isl, br.priority, uncached, dwid)
                except NoWorkers:
                    reason, pick = None, None
                if reason is not None:
                    self._count("local_prefill_queue_long")
                    return self._start_on(sr, self.by_name[dwid], phashes, dov, full=True)
                if pick is not None:
                    pw = self.by_name[pick[0]]
                    return self._start_on(sr, pw, phashes, pick[1], full=(pw.role != "prefill"))
        try:
            wid, ov = self.router.select(phashes, br.isl, pool)
        except NoWorkers:
            # as the frontend does: with no prefill worker (e.g. 0P2D, or the only one is flipping)
            # a decode worker serves the whole request; with no decode worker a prefill worker does
            for alt in ("decode", "prefill"):
                try:
                    wid, ov = self.router.select(phashes, br.isl, alt)
                except NoWorkers:
                    continue
                return self._start_on(sr, self.by_name[wid], phashes, ov, full=True)
            self.pending.append(sr)         # retried when a worker becomes active
            return
        w = self.by_name[wid]
        self._start_on(sr, w, phashes, ov, full=(w.role != "prefill"))

    def _count(self, reason: str) -> None:
        self.disagg_decisions[reason] = self.disagg_decisions.get(reason, 0) + 1

    def _start_on(self, sr: SimReq, w: SimWorker, phashes, ov: int, full: bool) -> None:
        br = sr.br
        e = self._touch(w)
        params = self._params_for(br.osl) if full else self._first_params
        try:
            e.add_request(sr.rid, br.isl, params, br.priority, arrival_time=sr.t_arr,
                          hold_kv=not full, block_hashes=sr.hashes, token_times=sr.times, owner=sr)
        except TandemError as ex:
            self._fail(sr, "http_400", str(ex))
            return
        self.router.on_assign(w.name, sr.rid, phashes, br.isl, ov)
        if self.window is not None:
            self.window.on_arrival(self.now, br.cls, br.isl, ov * self.block_size)
        sr.pw = w
        sr.stage = "both" if full else "prefill"
        self._kick(w)

    def _fail(self, sr: SimReq, kind: str, msg: str) -> None:
        sr.status, sr.error_kind, sr.error = "error", kind, msg[:300]
        sr.done = True
        sr.stage = "done"
        sr.hashes = None
        self.failed += 1
        if sr.t_last is None:
            sr.t_last = self.now
        if self.columns is not None:
            self.columns.add(sr.br, sr.lag, False, None, sr.t_last, 0, None, None, kind)
        if self.client_queue:
            self._slot_freed()

    def _roles_changed(self) -> None:
        """Disaggregated mode while any live worker is (or is becoming) a prefill worker."""
        self._disagg = any(w.state != "stopped" and (w.role == "prefill" or w.target_role == "prefill")
                           for w in self.workers)

    # ------------------------------------------------------------------ engine callbacks
    def _on_engine_first(self, w: SimWorker, req, t: float) -> None:
        sr: SimReq = req.owner
        if sr is None or sr.t_first is not None:
            return
        sr.t_first = t
        sr.t_sched = req.first_scheduled_at
        sr.cached = req.num_cached_tokens
        self.router.on_first_token(w.name, sr.rid)
        if self.window is not None:
            self._win_first(sr, t)

    def _on_engine_finish(self, w: SimWorker, req, t: float) -> None:
        """Called from inside the engine's step processing: only bookkeeping and new events here,
        never calls into an engine."""
        sr: SimReq = req.owner
        w.dirty = True
        if sr is None or sr.done:
            return
        if sr.stage == "prefill" and req.hold_kv:
            if sr.br.osl <= 1:
                self._push(t, EV_CALL, (self._release_held, (sr, w)))
                self._complete(sr, t, 1)
            else:
                self._to_decode(sr, w, req.num_computed_tokens)
            return
        self.router.on_finish(w.name, sr.rid)
        self._complete(sr, t, len(req.output_token_ids))
        if w.state != "active":
            self._check_drained(w)

    def _release_held(self, sr: SimReq, w: SimWorker) -> None:
        self.router.on_finish(w.name, sr.rid)
        self._touch(w).release_kv(sr.rid)
        self._kick(w)
        self._check_drained(w)

    def _win_first(self, sr: SimReq, t: float) -> None:
        wait = (sr.t_sched - sr.t_arr) if sr.t_sched is not None else None
        self.window.on_first_token(t, sr.br.cls, sr.t_first - sr.t_arr, wait)

    def _complete(self, sr: SimReq, t: float, n_out: int) -> None:
        sr.t_last = t
        sr.n_out = n_out
        sr.done = True
        sr.stage = "done"
        sr.hashes = None
        self.completed += 1
        self.out_tokens += n_out
        if self.columns is not None:
            self.columns.add(sr.br, sr.lag, True, sr.t_first, t, n_out, sr.cached, sr.times)
        if self.client_queue:
            self._slot_freed()
        if self.window is not None:
            tp = (t - sr.t_first) / (n_out - 1) if n_out > 1 and sr.t_first is not None else None
            self.window.on_tokens(t, sr.br.cls, n_out)
            self.window.on_finish(t, sr.br.cls, n_out, tp)

    # ------------------------------------------------------------------ disaggregation
    def _to_decode(self, sr: SimReq, src: SimWorker, num_tokens: int, outputs: Sequence[int] | None = None) -> None:
        """Pick a decode worker and start moving `num_tokens` tokens of KV there from `src`
        (`outputs`: the tokens generated so far when a decode is migrated, else None)."""
        br = sr.br
        phashes = sr.hashes[:br.isl // self.block_size]
        if outputs is not None:
            src.migrating += 1
        try:
            wid, ov = self.router.select(phashes, br.isl, "decode", exclude=(src.name,))
        except NoWorkers:                                # no decode worker now: wait for one
            if outputs is not None:
                src.migrating -= 1
            self.pending_decode.append((sr, src, num_tokens, outputs))
            sr.stage = "transfer"
            return
        dst = self.by_name[wid]
        # blocks the destination already caches are not copied
        hit = dst.engine.prefix_hit_blocks(phashes) * self.block_size
        send = max(0, num_tokens - hit)
        dt = self.profile.transfer_time(send, self._xfer_gbps, self.cfg.transfer_latency_s)
        self.router.on_assign(wid, sr.rid, phashes, br.isl, ov)
        sr.stage = "transfer"
        sr.dw = dst
        self._push(self.now + dt, EV_XFER, (sr, src, dst, num_tokens, outputs))

    def _xfer_done(self, sr: SimReq, src: SimWorker, dst: SimWorker, num_tokens: int, outputs) -> None:
        br = sr.br
        if outputs is not None:                          # a migrated decode has left its old worker
            src.migrating -= 1
        self._release_held(sr, src)                      # the source drops the blocks it held
        outs = outputs if outputs is not None else [SIM_TOKEN]
        e = self._touch(dst)
        kvx = SimKVExport(sr.rid, (), outs, num_tokens, self.block_size)
        try:
            req = e.add_request(sr.rid, br.isl, self._params_for(br.osl), br.priority, arrival_time=sr.t_arr,
                                output_token_ids=outs, kv_import=kvx, block_hashes=sr.hashes,
                                token_times=sr.times, owner=sr)
        except TandemError as ex:
            self._fail(sr, "http_400", str(ex))
            return
        sr.stage = "decode"
        self.router.on_first_token(dst.name, sr.rid)
        self._kick(dst)
        self._check_drained(dst)

    # ------------------------------------------------------------------ status publication
    def _publish(self) -> None:
        r = self.router
        for w in self.workers:
            if w.state == "stopped":
                continue
            e = w.engine
            if e.state == WINDOW:
                e.observe(self.now)
            elif not w.dirty and e._stats.steps == w.pub_steps:
                continue
            w.dirty = False
            w.pub_steps = e._stats.steps
            st = self._load(e)
            r.update_load(w.name, st)
            stored, removed = e.drain_kv_events()
            if stored or removed:
                r.apply_kv_events(w.name, stored, removed)

    @staticmethod
    def _load(e: SimEngine) -> dict:
        """The load fields of the worker's status (EngineStats names) the router reads."""
        sch = e.scheduler
        return {"num_running": e.num_running, "num_waiting": len(sch.waiting),
                "waiting_prefill_tokens": sch.waiting_prefill_tokens(), "kv_blocks_used": e.kv.pool.num_used,
                "kv_blocks_total": e.kv.pool.num_blocks}

    # ------------------------------------------------------------------ timeline
    def _sample(self) -> None:
        pools = {r: 0 for r in ROLES}
        gpus = 0
        busy = 0.0
        kv = 0.0
        queued = 0
        n_active = 0
        for w in self.workers:
            if w.state == "stopped":
                continue
            gpus += 1
            role = w.target_role if w.state in ("flipping", "starting") and w.target_role else w.role
            pools[role] += 1
            e = w.engine
            if e.state == WINDOW:
                e.observe(self.now)
            kv += e.kv.pool.num_used / e.kv.pool.num_blocks
            n_active += 1
            if e.scheduler.waiting:
                queued += sum(r.remaining_to_compute for r in e.scheduler.waiting)
        busy = sum(w.engine.busy_s for w in self.workers)
        dt = self.now - self._tl_t
        frac = None
        if self.timeline and dt > 0 and gpus:
            frac = max(0.0, min(1.0, (busy - self._tl_busy) / (dt * gpus)))
        self._tl_busy, self._tl_t = busy, self.now
        self.timeline.append({
            "t_s": round(self.now, 6), "sent": self.sent, "completed": self.completed, "failed": self.failed,
            "in_flight": self.sent - self.completed - self.failed, "output_tokens": self.out_tokens,
            "pools": {k: v for k, v in pools.items() if v},
            "num_gpus": float(gpus), "num_workers": gpus,
            "busy_frac": None if frac is None else round(frac, 4),
            "kv_usage": round(kv / n_active, 4) if n_active else 0.0,
            "queued_prefill_tokens": queued,
            "pending_at_router": len(self.pending),
        })

    # ------------------------------------------------------------------ planner
    def worker_views(self) -> list:
        from tandem.planner.types import WorkerView
        out = []
        for w in self.workers:
            if w.state == "stopped":
                continue
            e = w.engine
            if e.state == WINDOW:
                e.observe(self.now)
            st = e._stats
            t0, s0, p0, g0, b0 = w.prev
            dt = self.now - t0
            steps = st.steps - s0
            w.prev = (self.now, st.steps, st.prompt_tokens_computed, st.generated_tokens, e.busy_s)
            sch = e.scheduler
            out.append(WorkerView(
                worker_id=w.name, role=w.role, state=w.state, since=w.since,
                waiting_prefill_tokens=sch.waiting_prefill_tokens(),
                num_waiting=len(sch.waiting), num_running=e.num_running,
                kv_usage=e.kv.pool.num_used / e.kv.pool.num_blocks,
                kv_capacity_tokens=e.kv.pool.num_blocks * e.block_size,
                step_time_s=(e.busy_s - b0) / steps if steps else 0.0,
                prefill_tokens_per_s=(st.prompt_tokens_computed - p0) / dt if dt > 0 else 0.0,
                decode_tokens_per_s=(st.generated_tokens - g0) / dt if dt > 0 else 0.0,
                target_role=w.target_role, gpus=1))
        return out

    def _planner_tick(self) -> None:
        from tandem.planner.types import ClusterView
        workers = self.worker_views()
        view = self.window.view(self.now, workers) if self.window is not None else \
            ClusterView(now=self.now, workers=workers, window_s=self.cfg.planner_tick_s)
        tick = self.planner.tick
        try:
            nparams = len(inspect.signature(tick).parameters)
        except (TypeError, ValueError):
            nparams = 1
        decisions = tick(self.now, view) if nparams >= 2 else tick(view)
        for d in decisions or []:
            self.decisions.append(d.to_dict() if hasattr(d, "to_dict") else dict(d))
            self.connector.apply(d)

    # ------------------------------------------------------------------ lifecycle (connector)
    def _check_drained(self, w: SimWorker) -> None:
        if w.state not in ("flipping", "draining") or w.flip_pending:
            return
        e = w.engine
        if e.requests or e.held or w.migrating:
            return
        w.flip_pending = True
        if w.state == "flipping":
            self._push(self.now + self.profile.role_flip_s, EV_LIFE, ("flipped", w))
        else:
            self._push(self.now, EV_LIFE, ("stopped", w))

    def _lifecycle(self, what: str, w: SimWorker) -> None:
        if what == "flipped":
            w.role, w.state, w.target_role, w.since, w.flip_pending = w.target_role, "active", None, self.now, False
            self.router.set_role(w.name, w.role)
            _set_alive(self.router, w.name, True)
        elif what == "started":
            w.role, w.state, w.target_role, w.since = w.target_role, "active", None, self.now
            self.router.set_role(w.name, w.role)
            _set_alive(self.router, w.name, True)
        elif what == "stopped":
            w.state, w.stopped_at = "stopped", self.now
            self.router.remove_worker(w.name)
        w.dirty = True
        self._roles_changed()
        self._retry_pending()

    def _retry_pending(self) -> None:
        if self.pending:
            q, self.pending = self.pending, deque()
            for sr in q:
                self._dispatch(sr)
        if self.pending_decode:
            q, self.pending_decode = self.pending_decode, deque()
            for sr, src, n, outs in q:
                self._to_decode(sr, src, n, outs)

    def _migrate(self, w: SimWorker) -> None:
        """decode -> prefill: move in-flight decodes to other decode workers (detach, KV transfer, continue
    there with the tokens so far); without another decode worker they finish here (drain)."""
        if not any(o is not w and o.state == "active" and o.role in ("decode", "both") for o in self.workers):
            return
        e = self._touch(w)
        for rid in list(e.requests):
            req = e.requests[rid]
            sr: SimReq | None = req.owner
            if sr is None or sr.stage != "decode" or not req.output_token_ids:
                continue
            e.detach_request(rid)                      # KV held until the transfer lands
            n = req.num_computed_tokens
            outs = list(req.output_token_ids)
            self._to_decode(sr, w, n, outs)
        self._kick(w)

    # ------------------------------------------------------------------ main loop
    def run(self, progress=None) -> None:
        reqs = self.requests
        n = len(reqs)
        heap = self.heap
        ovh = self.cfg.request_overhead_s
        self._push(0.0, EV_PUBLISH, None)
        self._push(0.0, EV_TIMELINE, None)
        if self.planner is not None:
            self._push(self.cfg.planner_tick_s, EV_PLANNER, None)
        ai = 0
        inf = math.inf
        it = iter(reqs)                         # a list, or generated in arrival order (stream.py)
        nxt = next(it, None)
        t_arr = nxt.arrival_s + ovh if nxt is not None else inf
        pop = heapq.heappop
        push = heapq.heappush
        gc_was = gc.isenabled()
        gc.collect()
        gc.freeze()                  # the run allocates millions of long-lived objects and no cycles
        gc.disable()                 # worth collecting: a full collection would scan them all, often
        with _router_clock(self):
            try:
                while True:
                    if heap and heap[0][0] <= t_arr:
                        t, _, kind, obj, gen = pop(heap)
                        self.now = t
                        self.events += 1
                        if kind == EV_WORKER:
                            if obj.gen != gen:
                                continue
                            obj.t_event = None
                            e = obj.engine
                            e.on_event(t)
                            tn = e.t_next
                            if tn is not None and obj.t_event is None:   # self._resched(obj), inlined
                                obj.gen = gen = obj.gen + 1
                                obj.t_event = tn
                                self._seq += 1
                                push(heap, (tn, self._seq, EV_WORKER, obj, gen))
                            elif tn is not None or obj.t_event is not None:
                                self._resched(obj)
                            if obj.state != "active":
                                self._check_drained(obj)
                        elif kind == EV_XFER:
                            self._xfer_done(*obj)
                        elif kind == EV_PUBLISH:
                            self._publish()
                            if not self._finished(ai, n):
                                self._push(t + self.cfg.publish_interval_s, EV_PUBLISH, None)
                        elif kind == EV_TIMELINE:
                            self._sample()
                            if progress is not None:
                                progress(self)
                            if not self._finished(ai, n):
                                self._push(t + self.cfg.timeline_interval_s, EV_TIMELINE, None)
                        elif kind == EV_PLANNER:
                            self._planner_tick()
                            if not self._finished(ai, n):
                                self._push(t + self.cfg.planner_tick_s, EV_PLANNER, None)
                        elif kind == EV_LIFE:
                            self._lifecycle(*obj)
                        elif kind == EV_CALL:
                            obj[0](*obj[1])
                    elif ai < n:
                        self.now = self._t_last_arrival = t_arr
                        self._arrive(nxt, t_arr)
                        ai += 1
                        nxt = next(it, None)
                        t_arr = nxt.arrival_s + ovh if nxt is not None else inf
                    else:
                        break
            finally:
                gc.unfreeze()
                if gc_was:
                    gc.enable()
        # requests that can never be served (no worker for their pool)
        for sr in list(self.pending) + [x[0] for x in self.pending_decode]:
            if not sr.done:
                self._fail(sr, "no_worker", "no worker could take the request")
        self.pending.clear()
        self.pending_decode.clear()
        self._sample()

    def _finished(self, ai: int, n: int) -> bool:
        if ai < n or self.client_queue:
            return False
        left = self.sent - self.completed - self.failed
        if left:
            # only requests no worker can take are left, and no worker is on its way: stop the
            # periodic events so the run ends (they are failed as no_worker) instead of ticking forever
            return (len(self.pending) + len(self.pending_decode) >= left
                    and self.now - self._t_last_arrival > self.cfg.stall_timeout_s
                    and not any(w.state in ("flipping", "starting") for w in self.workers))
        return True

    # ------------------------------------------------------------------ results
    def records(self) -> list:
        RequestRecord = sim_record_class()
        out = []
        for sr in self.reqs:
            br = sr.br
            a = br.arrival_s + sr.lag            # the actual send (bench: arrival_s + dispatch_lag_s)
            rec = RequestRecord(arrival_s=br.arrival_s, cls=br.cls, priority=br.priority, isl=br.isl,
                                osl_requested=br.osl, idx=br.idx, prompt_tokens=br.isl,
                                dispatch_lag_s=sr.lag)
            if sr.status == "ok":
                rec.output_tokens = sr.n_out
                rec.ttft_s = sr.t_first - a
                rec.e2e_s = sr.t_last - a
                rec.cached_tokens = sr.cached
                rec.finish_reason = "length"
                if sr.times is not None:
                    rec.token_times_s = [x - a for x in sr.times]
            else:
                rec.status, rec.error_kind, rec.error = "error", sr.error_kind, sr.error
                rec.e2e_s = (sr.t_last or self.now) - a
            out.append(rec)
        return out

    def leaks(self) -> dict[str, int]:
        """KV blocks still referenced per worker after the run (should all be 0)."""
        out = {}
        for w in self.workers:
            e = w.engine
            used = e.kv.pool.num_used
            if used or e.requests or e.held:
                out[w.name] = used
        return out

    def gpu_seconds(self) -> float:
        return sum(((w.stopped_at if w.stopped_at is not None else self.now) - w.started_at) for w in self.workers)

    def totals(self) -> dict:
        """The run's counters for the report (a `--shards` merge adds them up over domains)."""
        ws = self.workers
        return {"virtual": self.now, "events": self.events,
                "steps": sum(w.engine._stats.steps for w in ws),
                "win_steps": sum(w.engine.window_steps for w in ws),
                "preemptions": sum(w.engine.scheduler.num_preemptions for w in ws),
                "gpu_seconds": self.gpu_seconds(), "leaks": self.leaks(),
                "num_kv_blocks": ws[0].engine.kv.pool.num_blocks, "disagg_decisions": dict(self.disagg_decisions)}


class SimConnector:
    """The planner's connector in virtual time (tandem.planner.connector.Connector contract)."""

    def __init__(self, cluster: SimCluster):
        self.c = cluster

    def workers(self) -> list:
        return self.c.worker_views()

    def apply(self, d) -> object:
        action = d.action if hasattr(d, "action") else d["action"]
        get: Any = (lambda k: getattr(d, k, None)) if hasattr(d, "action") else d.get
        if action == "flip":
            return self.flip(get("worker_id"), get("to_role"))
        if action == "start":
            return self.start_worker(get("to_role") or "decode")
        if action == "stop":
            g = get("graceful")
            return self.stop_worker(get("worker_id"), True if g is None else g)
        return None

    def _w(self, worker_id) -> SimWorker | None:
        c = self.c
        if isinstance(worker_id, int):
            return c.workers[worker_id] if 0 <= worker_id < len(c.workers) else None
        return c.by_name.get(str(worker_id))

    def flip(self, worker_id, role: str) -> bool:
        c = self.c
        w = self._w(worker_id)
        if w is None or w.state != "active" or role not in ROLES or role == w.role:
            return False
        old = w.role
        w.state, w.target_role, w.flip_pending = "flipping", role, False
        w.since = c.now
        _set_alive(c.router, w.name, False)
        c._roles_changed()
        if old in ("decode", "both") and role == "prefill":
            c._migrate(w)
        c._check_drained(w)
        return True

    def start_worker(self, role: str = "decode"):
        c = self.c
        if role not in ROLES:
            return None
        w = c._new_worker(role, "starting")
        w.target_role = role
        c._roles_changed()
        c._push(c.now + c.profile.worker_start_s, EV_LIFE, ("started", w))
        return w.name

    def stop_worker(self, worker_id, graceful: bool = True) -> bool:
        c = self.c
        w = self._w(worker_id)
        if w is None or w.state in ("stopped", "draining"):
            return False
        w.state = "draining"
        w.flip_pending = False
        _set_alive(c.router, w.name, False)
        c._roles_changed()
        if not graceful:
            e = c._touch(w)
            for rid in list(e.requests):
                sr: SimReq | None = e.requests[rid].owner
                e.abort_request(rid)
                c.router.on_finish(w.name, rid)
                if sr is not None and not sr.done:
                    c._fail(sr, "worker_stopped", "the worker was stopped with the request in flight")
            for rid in list(e.held):
                e.release_kv(rid)
        c._check_drained(w)
        return True
