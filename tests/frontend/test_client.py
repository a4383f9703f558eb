"""EngineClient against fake workers (threads speaking the real protocol over ZeroMQ): routing, retry
before the first token, error after it, heartbeat timeout, abort on close."""
from __future__ import annotations

import asyncio
import tempfile
import threading
import time

import pytest
import zmq

from tandem.frontend.client import EngineClient
from tandem.router.kv_router import KvRouter, RouterConfig
from tandem.worker.protocol import (Abort, Delta, Deltas, Generate, Ready, Shutdown, WorkerStatus, decode,
                                    encode)


class FakeWorker(threading.Thread):
    """mode: 'ok' (3 tokens then finish), 'hang' (accept, never answer), 'one' (1 token then hang)."""

    def __init__(self, wid: str, out_addr: str, sock_dir: str, mode: str = "ok"):
        super().__init__(daemon=True)
        self.wid, self.out_addr, self.mode = wid, out_addr, mode
        self.addr = f"ipc://{sock_dir}/{wid}"
        self.received: list = []
        self.heartbeat = True
        self.stop_flag = False
        self.ready = threading.Event()

    def run(self):
        ctx = zmq.Context()
        out = ctx.socket(zmq.PUSH)
        out.connect(self.out_addr)
        inp = ctx.socket(zmq.PULL)
        inp.bind(self.addr)
        out.send(encode(Ready(self.wid, "both", self.addr, 0, "m", "cpu", 128, 4, 1000, 8, 100)))
        self.ready.set()
        seq = 0
        while not self.stop_flag:
            if inp.poll(20):
                msg = decode(inp.recv())
                self.received.append(msg)
                if isinstance(msg, Shutdown):
                    break
                if isinstance(msg, Generate):
                    rid = msg.request_id
                    if self.mode == "ok":
                        for i in range(3):
                            out.send(encode(Deltas(self.wid, [Delta(rid, [10 + i], f"t{i}", i == 2,
                                                                    "length" if i == 2 else None,
                                                                    len(msg.prompt_token_ids), i + 1)])))
                    elif self.mode == "one":
                        out.send(encode(Deltas(self.wid, [Delta(rid, [5], "x", False, None,
                                                                len(msg.prompt_token_ids), 1)])))
            if self.heartbeat:
                seq += 1
                out.send(encode(WorkerStatus(self.wid, "both", seq, {"kv_blocks_used": 0, "kv_blocks_total": 1000})))
        inp.close(0)
        out.close(0)
        ctx.term()


class FakeRuntime:
    def __init__(self):
        self.dead: dict[str, int] = {}

    def exited(self):
        return dict(self.dead)


@pytest.fixture
def env():
    d = tempfile.mkdtemp(prefix="tandem-test-")
    rt = FakeRuntime()
    client = EngineClient(f"ipc://{d}/out", KvRouter(RouterConfig(seed=0)), rt, heartbeat_timeout=0.6)
    workers: list[FakeWorker] = []

    def add(wid, mode):
        w = FakeWorker(wid, client.out_addr, d, mode)
        w.start()
        workers.append(w)
        return w

    yield client, rt, add
    for w in workers:
        w.stop_flag = True
        w.join(2)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_routes_streams_and_buffers(env):
    client, rt, add = env

    async def go():
        await client.start()
        add("a", "ok")
        assert await client.wait_ready(1, 5)
        h = client.submit("r1", [1, 2, 3, 4, 5], {"max_tokens": 3}, "interactive")
        ds = [d async for d in h]
        h.close()
        hb = client.submit("r2", [1, 2, 3], {"max_tokens": 3}, "batch", buffered=True)
        merged = [d async for d in hb]
        hb.close()
        await client.stop()
        return ds, merged

    ds, merged = _run(go())
    # deltas that queue up behind each other are coalesced: same text and tokens, fewer chunks
    assert "".join(d.new_text for d in ds) == "t0t1t2" and ds[-1].finished and 1 <= len(ds) <= 3
    assert [t for d in ds for t in d.new_token_ids] == [10, 11, 12]
    assert len(merged) == 1 and merged[0].new_text == "t0t1t2" and merged[0].new_token_ids == [10, 11, 12]
    assert merged[0].finish_reason == "length"


def test_retry_before_first_token_even_when_streaming(env):
    client, rt, add = env

    async def go():
        await client.start()
        hang = add("a", "hang")
        assert await client.wait_ready(1, 5)
        h = client.submit("r1", [1, 2, 3], {"max_tokens": 3}, "interactive")     # streaming
        assert h.worker_id == "a"
        add("b", "ok")
        assert await client.wait_ready(2, 5)
        await asyncio.sleep(0.1)
        rt.dead["a"] = -9                     # the process of worker a exits
        hang.stop_flag = True
        ds = [d async for d in h]
        h.close()
        await client.stop()
        return h, ds

    h, ds = _run(go())
    assert "".join(d.new_text for d in ds) == "t0t1t2"
    assert h.worker_id == "b" and h.retries == 1
    assert client.workers["a"].state == "dead"


def test_error_after_first_token_and_buffered_retry(env):
    client, rt, add = env

    async def go():
        await client.start()
        one = add("a", "one")
        assert await client.wait_ready(1, 5)
        hs = client.submit("s", [1, 2, 3], {}, "interactive")                   # streaming
        hb = client.submit("b", [4, 5, 6], {}, "interactive", buffered=True)     # non-streaming
        first = await hs.__anext__()
        assert first.new_text == "x"
        add("b", "ok")
        assert await client.wait_ready(2, 5)
        await asyncio.sleep(0.1)              # hb has received its one token from a (buffered, not yielded)
        rt.dead["a"] = -9
        one.stop_flag = True
        rest = [d async for d in hs]
        merged = [d async for d in hb]
        hs.close()
        hb.close()
        await client.stop()
        return rest, merged

    rest, merged = _run(go())
    assert len(rest) == 1 and rest[0].finish_reason == "error" and rest[0].error_code == "worker_died"
    assert merged[0].new_text == "t0t1t2"           # a's partial token was discarded
    assert merged[0].finish_reason == "length"


def test_heartbeat_timeout_and_no_workers(env):
    client, rt, add = env

    async def go():
        await client.start()
        w = add("a", "hang")
        assert await client.wait_ready(1, 5)
        h = client.submit("r", [1], {}, "interactive")
        w.heartbeat = False
        t0 = time.monotonic()
        ds = [d async for d in h]
        waited = time.monotonic() - t0
        h.close()
        await client.stop()
        return ds, waited

    ds, waited = _run(go())
    assert ds[-1].finish_reason == "error" and ds[-1].error_status == 503
    assert 0.4 < waited < 5
    assert client.workers["a"].state == "dead"


def test_a_stalled_frontend_does_not_declare_live_workers_dead(env):
    """The frontend's loop blocked for 3x the heartbeat timeout (a starved CPU, a long GC): the worker
    kept sending status, unread in the socket. That silence is the frontend's, not the worker's."""
    client, rt, add = env

    async def go():
        await client.start()
        add("a", "ok")
        assert await client.wait_ready(1, 5)
        await asyncio.sleep(0.3)
        time.sleep(3 * client.heartbeat_timeout)         # blocks the event loop, as a stall would
        client._check_workers()                          # the monitor may run before the reader drains
        alive = client.workers["a"].alive
        await asyncio.sleep(0.3)
        h = client.submit("r", [1, 2], {"max_tokens": 3}, "interactive")
        ds = [d async for d in h]
        h.close()
        await client.stop()
        return alive, ds

    alive, ds = _run(go())
    assert alive and ds[-1].finish_reason == "length"


def test_close_aborts_unfinished(env):
    client, rt, add = env

    async def go():
        await client.start()
        w = add("a", "hang")
        assert await client.wait_ready(1, 5)
        h = client.submit("r", [1, 2], {}, "interactive")
        await asyncio.sleep(0.05)
        h.close()
        h.close()                                 # idempotent
        await asyncio.sleep(0.2)
        assert not client.handles
        assert client.router.workers["a"].num_active == 0
        await client.stop()
        return w

    w = _run(go())
    aborts = [m for m in w.received if isinstance(m, Abort)]
    assert len(aborts) == 1 and aborts[0].request_ids == ["r"]
    assert any(isinstance(m, Shutdown) for m in w.received)
