"""Worker process: one engine driven over ZeroMQ.

    python -m tandem.worker.proc --worker-id w0 --model DIR --in-addr ipc:///tmp/x/w0 \
        --out-addr ipc:///tmp/x/out [--role both] [--engine-config JSON]

Sockets: a PULL socket bound at --in-addr receives commands (`Generate`, `Abort`, `SetRole`,
`Shutdown`); a PUSH socket connected to --out-addr sends `Ready`, one `Deltas` message per engine step
(all requests' outputs of that step), and `WorkerStatus` every --status-interval seconds (stats + KV
cache events; it is also the heartbeat). The loop steps the engine back to back while it has work and
otherwise blocks on the command socket until the next status is due.

Errors are per request: a request the engine refuses gets an error delta with the HTTP status to
report; an exception inside `step()` fails the requests in flight (error deltas) and the worker
keeps serving. The process exits when its parent dies (PR_SET_PDEATHSIG + a parent-pid check).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

import zmq

from tandem.worker.protocol import (ROLES, Abort, Delta, Deltas, Generate, Migrated, Ready, SetRole, Shutdown,
                                    WorkerFailed, WorkerStatus, decode, encode)

log = logging.getLogger("tandem.worker")


class WorkerCore:
    """The socket-free half of a worker: turns commands into engine calls and engine outputs into
    messages (`send` is called with each outgoing message). Unit-testable with any engine object that
    has the `Engine` methods used here."""

    def __init__(self, engine, worker_id: str, role: str = "both", send=None, transfer=None,
                 held_kv_ttl_s: float = 30.0):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.engine = engine
        self.transfer = transfer              # TransferAgent (KV server + fetches), None in unit tests
        self.lock = transfer.lock if transfer is not None else threading.Lock()
        self.held_kv_ttl_s = held_kv_ttl_s
        self.num_migrated = 0
        self.num_flips = 0
        self.last_flip: dict | None = None      # the last role flip, as reported in the status (see set_role)
        self.worker_id = worker_id
        self.role = role
        self.send = send or (lambda msg: None)
        self.active: set[str] = set()
        self.seq = 0
        self.stopping = False
        self.num_step_errors = 0

    # ------------------------------------------------------------------ commands
    def handle(self, msg) -> None:
        if isinstance(msg, Generate):
            self._generate(msg)
        elif isinstance(msg, Abort):
            self._abort(msg.request_ids)
        elif isinstance(msg, SetRole):
            self.set_role(msg.role, msg.migrate)
        elif isinstance(msg, Shutdown):
            self.stopping = True
        else:
            log.warning("worker %s: ignoring unexpected message %r", self.worker_id, type(msg).__name__)

    def set_role(self, role: str, migrate: bool = True) -> None:
        """Flip the role in place (weights stay loaded). The router stops sending work of the old role
        as soon as the next status reports the new one. prefill→decode: queued prefills simply finish
        (they are held for export as before). decode/both→prefill with `migrate`: every generating
        request is detached with its KV held, and a `Migrated` message tells the frontend to continue
        it on another worker, which fetches the KV — nothing is lost or recomputed."""
        if role not in ROLES:
            log.warning("worker %s: ignoring unknown role %r", self.worker_id, role)
            return
        t0 = time.perf_counter()
        old, self.role = self.role, role
        moved = 0
        if role == "prefill" and old != "prefill" and migrate and self.transfer is not None:
            for rid in list(self.active):
                req = self.engine.requests.get(rid)
                if req is None or req.hold_kv:
                    continue                    # a prefill-for-export request stays: it is prefill work
                last = self.engine.detach_request(rid)
                if last is None:
                    continue                    # it finished in the step in flight: its output follows
                self.active.discard(rid)
                # a detached request's last delta carries all unsent text: keep back what could start a
                # stop string (as the engine would); the worker that continues streams it
                stops = req.params.stop or []
                keep = min(len(last.new_text), max((len(x) for x in stops), default=1) - 1)
                if keep > 0:
                    last.new_text = last.new_text[:-keep]
                if last.new_token_ids or last.new_text:
                    self.send(Deltas(self.worker_id, [Delta.from_output(last)]))
                self.send(Migrated(self.worker_id, rid, list(req.output_token_ids), self.transfer.addr, keep))
                moved += 1
        self.num_migrated += moved
        flip_s = time.perf_counter() - t0
        self.num_flips += 1
        self.last_flip = {"from": old, "to": role, "at": time.monotonic() - flip_s, "flip_s": round(flip_s, 6),
                          "drain_s": None, "migrated": moved}
        self._check_drained()
        log.info("worker %s: role %s -> %s (%d requests migrated, %.1f ms)", self.worker_id, old, role, moved,
                 flip_s * 1e3)

    def _old_role_work(self) -> int:
        """Requests of the role this worker flipped away from that it is still computing: prefills held
        for export after a flip to decode; decodes (and their KV fetches) after a flip to prefill."""
        reqs = getattr(self.engine, "requests", {})
        to = self.last_flip["to"]
        if to == "decode":
            return sum(1 for r in reqs.values() if getattr(r, "hold_kv", False))
        if to == "prefill":
            fetching = self.transfer.inflight if self.transfer is not None else 0
            return fetching + sum(1 for r in reqs.values() if not getattr(r, "hold_kv", False))
        return 0

    def _check_drained(self) -> None:
        """Complete `last_flip` with `drain_s` (SetRole to no old-role work left) once that is true, so
        /v1/cluster shows how long a flip really took on the worker (monotonic clock, as the planner's)."""
        f = self.last_flip
        if f is not None and f["drain_s"] is None and self._old_role_work() == 0:
            f["drain_s"] = round(time.monotonic() - f["at"], 6)

    def _generate(self, g: Generate) -> None:
        from tandem.common.errors import TandemError
        from tandem.common.sampling import SamplingParams
        rid = g.request_id
        if g.kv_source and self.transfer is not None and not getattr(g, "_fetched", False):
            self.active.add(rid)
            self.transfer.start_fetch(g, list(g.prompt_token_ids), g.kv_source["addr"], g.kv_source["request_id"])
            return
        try:
            params = SamplingParams.from_dict(g.sampling)
            kw = {}
            if g.hold_kv:
                kw["hold_kv"] = True
            if g.output_token_ids:
                kw["output_token_ids"] = g.output_token_ids
            kv = getattr(g, "_kv", None)
            if kv is not None:
                kw["kv_import"] = kv
            self.engine.add_request(rid, list(g.prompt_token_ids), params, g.priority, **kw)
            self.active.add(rid)
            if g.unsent_text_chars and g.output_token_ids:
                self._unsend_text(rid, g.unsent_text_chars)
        except TandemError as e:
            self.send(Deltas(self.worker_id, [Delta.failure(rid, str(e), e.http_status, e.code,
                                                            getattr(e, "param", None))]))
        except (TypeError, ValueError) as e:
            self.send(Deltas(self.worker_id, [Delta.failure(rid, f"invalid request: {e}", 400,
                                                            "invalid_request_error")]))
        except Exception as e:  # noqa: BLE001 - a bad request must not kill the worker
            log.exception("worker %s: add_request(%s) failed", self.worker_id, rid)
            self.send(Deltas(self.worker_id, [Delta.failure(rid, f"worker error: {e}")]))

    def _unsend_text(self, rid: str, n: int) -> None:
        """The engine counts the resumed tokens' text as already streamed; the frontend held back its
        last `n` characters (a possible stop-string start), so stream them from here, with the engine's
        own hold-back and stop-string checks."""
        req = getattr(self.engine, "requests", {}).get(rid)
        if req is not None and hasattr(req, "sent_text_len"):
            req.sent_text_len = max(0, req.sent_text_len - n)

    def poll_transfers(self) -> None:
        """Add the requests whose KV arrived (or failed: they recompute). Call with the lock held."""
        if self.transfer is None:
            return
        for r in self.transfer.completed():
            g = r.item
            if g.request_id not in self.active:      # aborted while its KV was in flight
                if r.ack:
                    self.transfer.ack(r.ack)
                continue
            self.active.discard(g.request_id)
            g._fetched, g._kv = True, r.kv
            self._generate(g)
            if r.ack:
                self.transfer.ack(r.ack)              # the source frees its held blocks

    def _abort(self, rids: list[str]) -> None:
        outs = []
        for rid in rids:
            try:
                o = self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                log.exception("worker %s: abort(%s) failed", self.worker_id, rid)
                o = None
            if rid in self.active:
                self.active.discard(rid)
                outs.append(Delta.from_output(o) if o is not None else
                            Delta(rid, [], "", True, "abort"))
        if outs:
            self.send(Deltas(self.worker_id, outs))

    # ------------------------------------------------------------------ stepping
    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def waiting_on_transfers(self) -> bool:
        return self.transfer is not None and self.transfer.inflight > 0

    def step(self) -> int:
        """One engine step; sends its outputs as one message. Returns the number of outputs."""
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001
            self.num_step_errors += 1
            log.error("worker %s: engine step failed; failing %d requests in flight\n%s", self.worker_id,
                      len(self.active), traceback.format_exc())
            failed = []
            for rid in list(self.active):
                try:
                    self.engine.abort_request(rid)
                except Exception:  # noqa: BLE001
                    pass
                failed.append(Delta.failure(rid, f"engine step failed: {type(e).__name__}: {e}"))
            self.active.clear()
            if failed:
                self.send(Deltas(self.worker_id, failed))
            return len(failed)
        if self.last_flip is not None and self.last_flip["drain_s"] is None:
            self._check_drained()
        if not outs:
            return 0
        deltas = []
        for o in outs:
            d = Delta.from_output(o)
            if d.finished:
                self.active.discard(d.request_id)
            if d.finish_reason == "error" and d.error_status is None:
                d.error_status, d.error_code = 500, "internal_error"
            deltas.append(d)
        self.send(Deltas(self.worker_id, deltas))
        return len(deltas)

    def status(self) -> WorkerStatus:
        st = self.engine.stats()
        stats = {k: v for k, v in vars(st).items()}
        stats["num_waiting"] = dict(stats.get("num_waiting") or {})
        stats["kv_usage"] = st.kv_usage
        stats["num_step_errors"] = self.num_step_errors
        stats["num_migrated"] = self.num_migrated
        if self.last_flip is not None:
            self._check_drained()
        stats["num_flips"] = self.num_flips
        stats["last_flip"] = dict(self.last_flip) if self.last_flip else None
        stats["num_held_kv"] = len(getattr(self.engine, "held", ()))
        if self.transfer is not None:
            stats["transfer"] = vars(self.transfer.counters)
            stats["transfer_served"] = vars(self.transfer.server.stats)
        if hasattr(self.engine, "release_stale_held"):
            stale = self.engine.release_stale_held(self.held_kv_ttl_s)
            if stale:
                log.warning("worker %s: released KV of %d requests never fetched", self.worker_id, len(stale))
        stored, evicted = self.engine.drain_kv_events()
        self.seq += 1
        return WorkerStatus(self.worker_id, self.role, self.seq, stats, list(stored), list(evicted),
                            len(self.active))


def _set_pdeathsig() -> None:
    """Ask Linux to SIGTERM us when the parent dies (no orphaned workers)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(core: WorkerCore, inp: zmq.Socket, out: zmq.Socket, status_interval: float = 0.1,
          parent_pid: int | None = None) -> None:
    """The worker loop (see the module docstring)."""
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    next_status = 0.0
    next_parent_check = time.monotonic() + 1.0
    while not core.stopping:
        now = time.monotonic()
        busy = core.has_work()
        timeout_ms = 0 if busy else max(0.0, (next_status - now) * 1000.0)
        if not busy and core.waiting_on_transfers():
            timeout_ms = min(timeout_ms, 2.0)
        if poller.poll(timeout_ms):
            while True:
                try:
                    buf = inp.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = decode(buf)
                except Exception:  # noqa: BLE001
                    log.exception("worker %s: undecodable message dropped", core.worker_id)
                    continue
                with core.lock:
                    core.handle(msg)
        if core.stopping:
            break
        with core.lock:
            core.poll_transfers()
            if core.has_work():
                core.step()
        now = time.monotonic()
        if now >= next_status:
            with core.lock:
                st = core.status()
            out.send(encode(st))
            next_status = now + status_interval
        if parent_pid is not None and now >= next_parent_check:
            next_parent_check = now + 1.0
            if not _pid_alive(parent_pid) or os.getppid() == 1:
                log.warning("worker %s: parent %d is gone; exiting", core.worker_id, parent_pid)
                break


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tandem.worker.proc", description="Tandem worker process")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--model", required=True, help="HF-format model directory")
    p.add_argument("--in-addr", required=True, help="ZeroMQ address to bind for commands")
    p.add_argument("--out-addr", required=True, help="ZeroMQ address of the frontend's output socket")
    p.add_argument("--role", default="both", choices=ROLES)
    p.add_argument("--engine-config", default="{}", help="JSON of EngineConfig fields (besides model)")
    p.add_argument("--status-interval", type=float, default=0.1)
    p.add_argument("--kv-host", default="127.0.0.1", help="interface for the KV transfer server")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--log-level", default=os.environ.get("TANDEM_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [worker {args.worker_id}] %(name)s: %(message)s")
    _set_pdeathsig()
    parent = args.parent_pid or os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.setsockopt(zmq.SNDHWM, 0)
    out.connect(args.out_addr)
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.LINGER, 0)
    inp.setsockopt(zmq.RCVHWM, 0)
    inp.bind(args.in_addr)
    addr = inp.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        from tandem.engine.config import EngineConfig
        from tandem.engine.engine import Engine
        cfg = json.loads(args.engine_config)
        cfg["model"] = args.model
        engine = Engine(EngineConfig(**cfg))
    except Exception as e:  # noqa: BLE001
        log.exception("worker %s: engine failed to start", args.worker_id)
        out.send(encode(WorkerFailed(args.worker_id, f"engine failed to start: {type(e).__name__}: {e}")))
        inp.close(linger=0)
        out.close(linger=2000)
        ctx.term()
        return 1
    from tandem.transfer.agent import TransferAgent
    transfer = TransferAgent(engine, threading.Lock(), host=args.kv_host)
    core = WorkerCore(engine, args.worker_id, args.role, send=lambda m: out.send(encode(m)), transfer=transfer)
    runner = getattr(engine, "runner", None)
    ready = Ready(
        worker_id=args.worker_id, role=args.role, addr=addr, pid=os.getpid(), model=args.model,
        device=str(getattr(runner, "device", cfg.get("device", "?"))),
        max_model_len=int(engine.max_model_len), block_size=int(engine.config.block_size),
        num_kv_blocks=int(engine.stats().kv_blocks_total), max_num_seqs=int(engine.config.max_num_seqs),
        vocab_size=int(getattr(getattr(engine, "model_config", None), "vocab_size", 0) or 0),
        host=socket.gethostname(), kv_addr=transfer.addr)
    from tandem.common.gcutil import freeze_startup_objects
    frozen = freeze_startup_objects()
    out.send(encode(ready))
    log.info("worker %s ready (pid %d, %s, role %s, %d KV blocks, %d start-up objects frozen out of the GC)",
             args.worker_id, os.getpid(), ready.device, args.role, ready.num_kv_blocks, frozen)
    try:
        serve(core, inp, out, args.status_interval, parent_pid=parent)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        transfer.close()
        inp.close(linger=0)
        out.close(linger=500)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
