"""Async client of the worker processes (the frontend's side of the ZeroMQ data plane).

One PULL socket (bound by the frontend) receives every worker's `Ready`, `Deltas` and `WorkerStatus`;
one PUSH socket per worker (connected to the address in its `Ready`) carries commands. Workers
register themselves by sending `Ready`, so the runtime that starts them (local subprocesses today,
Ray actors later) only has to tell them the frontend's address.

`submit()` picks a worker with the router, sends `Generate` and returns a `RequestHandle`: an async
iterator of `Delta`s (or, with `buffered=True`, of one merged delta at the end). `handle.close()`
(synchronous, idempotent; call it in `finally`) aborts the request on its worker if it is still
running, which frees its KV blocks.

A worker is dead when its process exits (the runtime says so) or its status heartbeat stops for
`heartbeat_timeout` seconds. Its requests that have yielded nothing yet (every buffered request) are
sent again to another worker; the others end with an error delta.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
import zmq.asyncio

from tandem.router.disagg import DisaggPolicy
from tandem.router.kv_router import KvRouter, NoWorkers
from tandem.worker.protocol import (Abort, Delta, Deltas, Generate, Migrated, Ready, SetRole, Shutdown,
                                    WorkerFailed, WorkerStatus, decode, encode)

log = logging.getLogger("tandem.frontend.client")


@dataclass
class WorkerInfo:
    worker_id: str
    role: str = "both"
    addr: str = ""
    pid: int | None = None
    host: str = ""
    kv_addr: str = ""
    device: str = ""
    model: str = ""
    max_model_len: int = 0
    block_size: int = 16
    num_kv_blocks: int = 0
    max_num_seqs: int = 0
    vocab_size: int = 0
    alive: bool = False
    state: str = "starting"            # starting | ready | draining | stopped | dead | failed
    error: str | None = None
    stats: dict = field(default_factory=dict)
    num_active_reported: int = 0
    last_seen: float = 0.0
    ready_at: float = 0.0
    status_seq: int = 0
    sock: Any = None

    def public(self) -> dict:
        return {"id": self.worker_id, "role": self.role, "state": self.state, "alive": self.alive,
                "pid": self.pid, "host": self.host, "device": self.device, "addr": self.addr,
                "max_model_len": self.max_model_len, "block_size": self.block_size,
                "num_kv_blocks": self.num_kv_blocks, "max_num_seqs": self.max_num_seqs, "error": self.error,
                "stats": self.stats, "last_status_age_s": round(time.monotonic() - self.last_seen, 3)
                if self.last_seen else None}


class RequestHandle:
    """One request in flight: iterate it for deltas; `close()` when done (aborts if unfinished)."""

    def __init__(self, client: "EngineClient", request_id: str, prompt_token_ids: list[int], hashes: list[int],
                 sampling: dict, priority: str, buffered: bool, pool: str = "both"):
        self.client = client
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.hashes = hashes
        self.sampling = sampling
        self.priority = priority
        self.buffered = buffered
        self.pool = pool
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker_id: str | None = None
        self.epoch = 0
        self.attempts = 0
        self.failed_workers: set[str] = set()
        self.n_yielded = 0
        self.done_on_worker = False      # the worker sent the final delta (nothing to abort)
        self.done = False                # the consumer got the final delta
        self.closed = False
        self.got_first_token = False
        self.first_token_at: float | None = None
        self.acc: Delta | None = None
        self.retries = 0
        self.phase = "single"            # "single" | "prefill" (remote prefill) | "decode" (after handoff)
        self.output_token_ids: list[int] = []   # tokens streamed so far (for handoff / migration)
        self.unsent_text_chars = 0       # text held back at a handoff or migration (stop strings)

    def retryable(self) -> bool:
        return self.n_yielded == 0 and self.attempts <= self.client.max_retries

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        while True:
            if self.done or self.closed:
                raise StopAsyncIteration
            epoch, d = await self.queue.get()
            if epoch != self.epoch:
                continue                       # from a worker this request has left
            if self.buffered:
                self._merge(d)
                if d.finished:
                    self.done = True
                    return self.acc
                continue
            self.n_yielded += 1
            if not d.finished and not self.queue.empty():
                d = self._coalesce(d)
            if d.finished:
                self.done = True
            return d

    def _coalesce(self, d: Delta) -> Delta:
        """Merge the deltas already queued behind `d` into one, so a frontend that falls behind sends
        fewer, larger SSE chunks instead of lagging further (no token is dropped)."""
        self.acc = None
        self._merge(d)
        while not self.acc.finished and not self.queue.empty():
            epoch, nxt = self.queue.get_nowait()
            if epoch == self.epoch:
                self._merge(nxt)
        out, self.acc = self.acc, None
        return out

    def _merge(self, d: Delta) -> None:
        a = self.acc
        if a is None:
            self.acc = Delta(d.request_id, list(d.new_token_ids), d.new_text, d.finished, d.finish_reason,
                             d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens,
                             list(d.logprobs) if d.logprobs else None, d.error, d.error_status, d.error_code,
                             d.error_param)
            return
        a.new_token_ids.extend(d.new_token_ids)
        a.new_text += d.new_text
        if d.logprobs:
            a.logprobs = (a.logprobs or []) + list(d.logprobs)
        a.finished, a.finish_reason = d.finished, d.finish_reason
        a.num_prompt_tokens = d.num_prompt_tokens or a.num_prompt_tokens
        a.num_output_tokens = d.num_output_tokens or a.num_output_tokens
        a.num_cached_tokens = d.num_cached_tokens or a.num_cached_tokens
        a.error, a.error_status, a.error_code, a.error_param = d.error, d.error_status, d.error_code, d.error_param

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client._release(self)


class EngineClient:
    MONITOR_INTERVAL_S = 0.1        # how often worker liveness is checked

    def __init__(self, out_addr: str, router: KvRouter | None = None, runtime=None,
                 heartbeat_timeout: float = 10.0, max_retries: int = 2,
                 on_change: Callable[[], None] | None = None, disagg: "DisaggPolicy | None" = None):
        self.out_addr = out_addr
        self.router = router or KvRouter()
        self.runtime = runtime
        self.heartbeat_timeout = heartbeat_timeout
        self._last_check: float | None = None
        self.max_retries = max_retries
        self.on_change = on_change
        self.workers: dict[str, WorkerInfo] = {}
        self.handles: dict[str, RequestHandle] = {}
        self.num_retried = 0
        self.num_worker_deaths = 0
        self.disagg = disagg or DisaggPolicy()
        self.disagg_decisions: dict[str, int] = {}     # reason -> count (remote or local prefill)
        self.num_handoffs = 0
        self.num_migrations = 0
        self._actx: zmq.asyncio.Context | None = None
        self._ctx: zmq.Context | None = None
        self._pull = None
        self._tasks: list[asyncio.Task] = []
        self._ready_event: asyncio.Event | None = None
        self.bound_addr: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._actx = zmq.asyncio.Context()
        self._ctx = zmq.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.out_addr)
        self.bound_addr = self._pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._ready_event = asyncio.Event()
        self._tasks = [asyncio.create_task(self._reader(), name="tandem-reader"),
                       asyncio.create_task(self._monitor(), name="tandem-monitor")]

    async def stop(self, shutdown_workers: bool = True) -> None:
        for w in self.workers.values():
            if w.alive and w.sock is not None and shutdown_workers:
                try:
                    w.sock.send(encode(Shutdown("frontend stopping")), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for w in self.workers.values():
            if w.sock is not None:
                w.sock.close(linger=200)
                w.sock = None
        if self._pull is not None:
            self._pull.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        if self._actx is not None:
            self._actx.term()

    async def wait_ready(self, n: int = 1, timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.alive_workers()) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.workers and all(w.state in ("failed", "dead") for w in self.workers.values()) \
                    and len(self.workers) >= n:
                return False
            self._ready_event.clear()
            try:
                await asyncio.wait_for(self._ready_event.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    def alive_workers(self, pool_roles: tuple[str, ...] | None = None) -> list[WorkerInfo]:
        """Workers that take new work (a draining worker finishes what it has and gets nothing new)."""
        return [w for w in self.workers.values()
                if w.alive and w.state != "draining" and (pool_roles is None or w.role in pool_roles)]

    def drain(self, worker_id: str) -> None:
        """Route nothing new to a worker (its in-flight requests go on), before `retire`."""
        w = self.workers[worker_id]
        if w.alive:
            w.state = "draining"
            rw = self.router.workers.get(worker_id)
            if rw is not None:
                rw.alive = False

    def worker_busy(self, worker_id: str) -> int:
        """Requests a worker still serves: streaming ones, and prefilled KV held for a decode worker."""
        w = self.workers.get(worker_id)
        mine = sum(1 for h in self.handles.values() if h.worker_id == worker_id and not h.done_on_worker)
        if w is None or not w.alive:
            return mine
        return mine + int(w.num_active_reported) + int(w.stats.get("num_held_kv", 0) or 0)

    def retire(self, worker_id: str) -> None:
        """A drained worker leaves on purpose: stopped, not dead (its exit is not a failure)."""
        w = self.workers.get(worker_id)
        if w is None or w.state in ("stopped", "dead", "failed"):
            return
        if w.sock is not None:
            try:
                w.sock.send(encode(Shutdown("stopped by the planner")), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            w.sock.close(linger=500)
            w.sock = None
        w.alive, w.state = False, "stopped"
        self.router.remove_worker(worker_id)
        self._changed()

    def expect_worker(self, worker_id: str, role: str = "both") -> None:
        """Register a worker the runtime is starting (shown as `starting` until its Ready arrives)."""
        self.workers.setdefault(worker_id, WorkerInfo(worker_id, role=role))

    # ------------------------------------------------------------------ requests
    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: dict, priority: str = "interactive",
               buffered: bool = False, hashes: list[int] | None = None, pool: str = "both") -> RequestHandle:
        """Route and send a request; raises NoWorkers when no worker can take it."""
        if request_id in self.handles:
            raise ValueError(f"duplicate request id {request_id!r}")
        if hashes is None:
            hashes = self.router.hashes_for(prompt_token_ids)
        h = RequestHandle(self, request_id, prompt_token_ids, hashes, sampling, priority, buffered, pool)
        self._dispatch(h)
        self.handles[request_id] = h
        return h

    def _dispatch(self, h: RequestHandle) -> None:
        """Route a request. With prefill and decode pools (disaggregated serving), a request is prefilled
        on a prefill worker unless the policy says a local prefill on the decode worker is cheaper; the
        decision and its reason are counted."""
        if h.pool == "both" and self._disaggregated():
            self._dispatch_disagg(h)
            return
        pool = h.pool if h.pool != "both" or self.alive_workers(("both",)) else "decode"
        h.phase = "single"
        wid, overlap = self.router.select(h.hashes, len(h.prompt_token_ids), pool, exclude=h.failed_workers)
        self._send_generate(h, wid, overlap, Generate(h.request_id, h.prompt_token_ids, h.sampling, h.priority))

    def _disaggregated(self) -> bool:
        return any(w.role in ("prefill", "decode") for w in self.alive_workers())

    def _count(self, reason: str) -> None:
        self.disagg_decisions[reason] = self.disagg_decisions.get(reason, 0) + 1

    def _dispatch_disagg(self, h: RequestHandle) -> None:
        n = len(h.prompt_token_ids)
        ex = h.failed_workers
        has_prefill = bool([w for w in self.alive_workers(("prefill",)) if w.worker_id not in ex])
        has_decode = bool([w for w in self.alive_workers(("decode", "both")) if w.worker_id not in ex])
        # served whole on a prefill worker: only prefill workers are left (they can still do it all),
        # or a short batch request (see DisaggPolicy)
        whole = "no_decode_worker" if not has_decode else \
            "batch_on_prefill" if has_prefill and self.disagg.stays_on_prefill(
                h.priority, h.sampling.get("max_tokens")) else None
        if whole is not None:
            wid, ov = self.router.select(h.hashes, n, "prefill", exclude=ex)
            self._count(whole)
            h.phase = "single"
            self._send_generate(h, wid, ov, Generate(h.request_id, h.prompt_token_ids, h.sampling, h.priority))
            return
        dwid, dov = self.router.select(h.hashes, n, "decode", exclude=ex)
        reason, pick = ("no_prefill_worker", None) if not has_prefill else self._local_reason(h, dwid, dov)
        if reason is not None:
            self._count(reason)
            h.phase = "single"
            self._send_generate(h, dwid, dov, Generate(h.request_id, h.prompt_token_ids, h.sampling, h.priority))
            return
        self._count("remote")
        pwid, pov = pick or self.router.select(h.hashes, n, "prefill", exclude=ex)
        sp = dict(h.sampling)
        sp["max_tokens"] = 1
        sp["min_tokens"] = min(1, sp.get("min_tokens", 0) or 0)
        sp["stop"] = []                       # stop strings are applied by the decode worker on the whole text
        h.phase = "prefill"
        self._send_generate(h, pwid, pov, Generate(h.request_id, h.prompt_token_ids, sp, h.priority, hold_kv=True))

    def _local_reason(self, h: RequestHandle, dwid: str, dov: int) -> tuple[str | None, tuple[str, int] | None]:
        """Why to prefill on decode worker `dwid` (None: remotely), and the prefill worker the queue
        rule chose (None: not chosen); see `DisaggPolicy.queue_reason`."""
        uncached = len(h.prompt_token_ids) - dov * max(1, self.router.workers[dwid].block_size)
        if self.disagg.short(uncached):
            return "local_short_uncached", None
        return self.disagg.queue_reason(self.router, h.hashes, len(h.prompt_token_ids), h.priority, uncached,
                                        dwid, h.failed_workers)

    def _send_generate(self, h: RequestHandle, wid: str, overlap: int, g: Generate) -> None:
        w = self.workers[wid]
        h.worker_id = wid
        h.attempts += 1
        h.done_on_worker = False
        self.router.on_assign(wid, h.request_id, h.hashes, len(h.prompt_token_ids), overlap)
        w.sock.send(encode(g), zmq.NOBLOCK)

    def _continue_on_decode(self, h: RequestHandle, source: WorkerInfo, reason: str) -> bool:
        """Hand a request whose KV `source` holds to a decode worker (after a remote prefill, or when
        `source` flipped away from decode). Returns False when no worker can take it."""
        ex = set(h.failed_workers) | {source.worker_id}
        try:
            dwid, dov = self.router.select(h.hashes, len(h.prompt_token_ids), "decode", exclude=ex)
        except NoWorkers:
            try:
                dwid, dov = self.router.select(h.hashes, len(h.prompt_token_ids), "prefill", exclude=ex)
            except NoWorkers:
                return False
        g = Generate(h.request_id, h.prompt_token_ids, h.sampling, h.priority,
                     output_token_ids=list(h.output_token_ids),
                     kv_source={"addr": source.kv_addr, "request_id": h.request_id} if source.kv_addr else None,
                     unsent_text_chars=h.unsent_text_chars)
        h.phase = "decode"
        if reason == "handoff":
            self.num_handoffs += 1
        else:
            self.num_migrations += 1
        self._send_generate(h, dwid, dov, g)
        return True

    def _release(self, h: RequestHandle) -> None:
        self.handles.pop(h.request_id, None)
        wid = h.worker_id
        if wid is None:
            return
        self.router.on_finish(wid, h.request_id)
        if not h.done_on_worker:
            self.abort_on(wid, [h.request_id])

    def abort_on(self, worker_id: str, request_ids: list[str]) -> None:
        w = self.workers.get(worker_id)
        if w is None or not w.alive or w.sock is None:
            return
        try:
            w.sock.send(encode(Abort(list(request_ids))), zmq.NOBLOCK)
        except zmq.ZMQError:
            log.warning("could not send abort to worker %s", worker_id)

    def set_role(self, worker_id: str, role: str) -> None:
        w = self.workers[worker_id]
        w.sock.send(encode(SetRole(role)), zmq.NOBLOCK)

    # ------------------------------------------------------------------ incoming messages
    async def _reader(self) -> None:
        pull = self._pull
        while True:
            buf = await pull.recv()
            try:
                msg = decode(buf)
            except Exception:  # noqa: BLE001
                log.exception("undecodable message from a worker dropped")
                continue
            try:
                self._on_message(msg)
            except Exception:  # noqa: BLE001
                log.exception("error handling %s", type(msg).__name__)

    def _on_message(self, msg) -> None:
        if isinstance(msg, Deltas):
            self._on_deltas(msg)
        elif isinstance(msg, WorkerStatus):
            w = self.workers.get(msg.worker_id)
            if w is None or not w.alive:
                return
            w.last_seen = time.monotonic()
            w.stats = msg.stats
            w.role = msg.role
            w.status_seq = msg.seq
            w.num_active_reported = msg.num_active
            self.router.set_role(msg.worker_id, msg.role)
            self.router.update_load(msg.worker_id, msg.stats)
            if msg.kv_stored or msg.kv_evicted:
                self.router.apply_kv_events(msg.worker_id, msg.kv_stored, msg.kv_evicted)
        elif isinstance(msg, Ready):
            self._on_ready(msg)
        elif isinstance(msg, Migrated):
            self._on_migrated(msg)
        elif isinstance(msg, WorkerFailed):
            w = self.workers.setdefault(msg.worker_id, WorkerInfo(msg.worker_id))
            w.error = msg.error
            log.error("worker %s failed: %s", msg.worker_id, msg.error)
            self._mark_dead(msg.worker_id, msg.error, state="failed")
            self._ready_event.set()

    def _on_ready(self, r: Ready) -> None:
        w = self.workers.get(r.worker_id)
        if w is None:
            w = self.workers[r.worker_id] = WorkerInfo(r.worker_id)
        if w.sock is not None:
            w.sock.close(linger=0)
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(r.addr)
        for k in ("role", "addr", "kv_addr", "pid", "host", "device", "model", "max_model_len", "block_size", "num_kv_blocks",
                  "max_num_seqs", "vocab_size"):
            setattr(w, k, getattr(r, k))
        w.sock, w.alive, w.state, w.error = sock, True, "ready", None
        w.last_seen = w.ready_at = time.monotonic()
        self.router.add_worker(r.worker_id, r.role, r.block_size, r.num_kv_blocks, r.max_num_seqs)
        log.info("worker %s ready: pid %s, %s, role %s, %d KV blocks of %d", r.worker_id, r.pid, r.device, r.role,
                 r.num_kv_blocks, r.block_size)
        self._ready_event.set()
        self._changed()

    def _on_deltas(self, msg: Deltas) -> None:
        router = self.router
        wid = msg.worker_id
        for d in msg.outputs:
            h = self.handles.get(d.request_id)
            if h is None or h.worker_id != wid:
                continue                       # aborted/closed, or from a worker the request has left
            h.output_token_ids.extend(d.new_token_ids)
            if h.phase == "prefill" and d.finished and d.finish_reason == "length" and d.error is None and \
                    len(h.output_token_ids) < int(h.sampling.get("max_tokens", 16)):
                # remote prefill done: the first token goes to the client now, the rest comes from decode
                router.on_finish(wid, d.request_id)
                d.finished, d.finish_reason = False, None
                self._hold_back_stop_prefix(h, d)
                if not h.got_first_token:
                    h.got_first_token, h.first_token_at = True, time.monotonic()
                h.queue.put_nowait((h.epoch, d))
                if not self._continue_on_decode(h, self.workers[wid], "handoff"):
                    h.done_on_worker = True
                    h.queue.put_nowait((h.epoch, Delta.failure(h.request_id, "no worker left to decode on", 503,
                                                               "service_unavailable")))
                continue
            if h.phase == "prefill" and d.finished:
                self.abort_on(wid, [d.request_id])     # finished at its first token: free the held KV
            if d.finished:
                h.done_on_worker = True
                if d.new_token_ids and h.first_token_at is None:
                    h.got_first_token = True
                    h.first_token_at = time.monotonic()
                router.on_finish(wid, d.request_id)
            elif d.new_token_ids:
                if not h.got_first_token:
                    h.got_first_token = True
                    h.first_token_at = time.monotonic()
                router.on_tokens(wid, d.request_id, d.num_output_tokens)
            h.queue.put_nowait((h.epoch, d))

    @staticmethod
    def _hold_back_stop_prefix(h: RequestHandle, d: Delta) -> None:
        """The prefill worker ran without stop strings (the decode worker applies them to the whole text),
        so its first token's text arrives unheld. Hold back its last (longest stop - 1) characters, as the
        engine does in aggregated serving, and let the decode worker stream them: a stop string that
        starts in the first token and ends in a later one is then never shown."""
        stops = h.sampling.get("stop") or []
        keep = min(len(d.new_text), max((len(s) for s in stops), default=1) - 1)
        h.unsent_text_chars = keep
        if keep > 0:
            d.new_text = d.new_text[:-keep]

    def _on_migrated(self, m: Migrated) -> None:
        h = self.handles.get(m.request_id)
        if h is None or h.worker_id != m.worker_id:
            self.abort_on(m.worker_id, [m.request_id])     # nobody wants it: free the held KV
            return
        self.router.on_finish(m.worker_id, m.request_id)
        h.output_token_ids = list(m.output_token_ids)
        h.unsent_text_chars = m.unsent_text_chars
        src = self.workers.get(m.worker_id)
        if src is None or not self._continue_on_decode(h, src, "migrate"):
            h.done_on_worker = True
            h.queue.put_nowait((h.epoch, Delta.failure(h.request_id, "no worker left to continue on", 503,
                                                       "service_unavailable")))

    # ------------------------------------------------------------------ failure detection
    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.MONITOR_INTERVAL_S)
            try:
                self._check_workers()
            except Exception:  # noqa: BLE001
                log.exception("worker monitor error")

    def _check_workers(self) -> None:
        now = time.monotonic()
        stalled = now - self._last_check - self.MONITOR_INTERVAL_S if self._last_check is not None else 0.0
        self._last_check = now
        if stalled > 0.5:
            # this process did not run (starved CPU, a long GC, a blocking call): the workers' status
            # messages of that time are still queued, unread. Their silence is ours, not theirs.
            for w in self.workers.values():
                w.last_seen += stalled
        exited = {}
        if self.runtime is not None:
            try:
                exited = self.runtime.exited()
            except Exception:  # noqa: BLE001
                log.exception("runtime.exited() failed")
        for wid, w in list(self.workers.items()):
            if w.state in ("dead", "failed", "stopped"):
                continue
            if wid in exited:
                self._mark_dead(wid, f"worker process exited with code {exited[wid]}",
                                state="failed" if w.state == "starting" else "dead")
                self._ready_event.set()
            elif w.alive and now - w.last_seen > self.heartbeat_timeout:
                self._mark_dead(wid, f"no heartbeat for {now - w.last_seen:.1f}s")
                # it may still be running (hung, or cut off): make sure it stops holding KV and GPU
                kill = getattr(self.runtime, "kill", None)
                if kill is not None:
                    try:
                        kill(wid)
                    except Exception:  # noqa: BLE001
                        log.exception("could not kill unresponsive worker %s", wid)

    def _mark_dead(self, worker_id: str, reason: str, state: str = "dead") -> None:
        w = self.workers.get(worker_id)
        if w is None or w.state in ("dead", "failed", "stopped"):
            return
        was_alive = w.alive
        w.alive, w.state = False, state
        w.error = w.error or reason
        if w.sock is not None:
            w.sock.close(linger=0)
            w.sock = None
        self.router.remove_worker(worker_id)
        if was_alive:
            self.num_worker_deaths += 1
            log.error("worker %s is dead (%s)", worker_id, reason)
        for h in list(self.handles.values()):
            if h.worker_id != worker_id or h.done_on_worker:
                continue
            h.failed_workers.add(worker_id)
            if h.retryable():
                h.epoch += 1
                h.acc = None
                h.output_token_ids = []
                h.phase = "single"
                h.got_first_token, h.first_token_at = False, None
                try:
                    self._dispatch(h)
                    self.num_retried += 1
                    h.retries += 1
                    log.warning("request %s retried on worker %s after worker %s died", h.request_id,
                                h.worker_id, worker_id)
                    continue
                except NoWorkers:
                    h.worker_id = None
                    h.queue.put_nowait((h.epoch, Delta.failure(
                        h.request_id, f"worker {worker_id} died ({reason}) and no other worker is available",
                        503, "service_unavailable")))
                    continue
            h.done_on_worker = True
            h.queue.put_nowait((h.epoch, Delta.failure(
                h.request_id, f"worker {worker_id} died while the request was streaming ({reason})",
                500, "worker_died")))
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001
                log.exception("on_change callback failed")
