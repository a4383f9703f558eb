"""A worker's side of KV transfer: serves its held KV to peers and fetches KV for requests it continues.

Fetches run on a small thread pool so a decode worker keeps stepping its batch while KV arrives; the
worker loop calls `completed()` each iteration and adds the requests whose KV is ready (or, on
failure/deadline, without KV: the engine recomputes the prefill — the request is never lost).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tandem.transfer.kv import KVServer, fetch_kv

log = logging.getLogger(__name__)


@dataclass
class FetchResult:
    item: Any                   # the caller's request object, returned untouched
    kv: Any | None              # KVExport or None (fall back to recompute)
    ack: Any | None
    seconds: float
    nbytes: int
    reason: str = "ok"


@dataclass
class TransferCounters:
    fetched: int = 0
    fallbacks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    fallback_reasons: dict = field(default_factory=dict)


class TransferAgent:
    def __init__(self, engine, lock: threading.Lock, host: str = "127.0.0.1", mode: str = "auto",
                 timeout_s: float = 5.0, workers: int = 2, direct: bool | None = None):
        self.engine, self.lock, self.timeout_s = engine, lock, timeout_s
        # fetch with the zero-staging CUDA path (KVServer docstring): 4-8x the staged path's bandwidth on
        # two H200s (docs/benchmarks.md); TANDEM_KV_DIRECT=0 falls back to staged copies
        self.direct = os.environ.get("TANDEM_KV_DIRECT", "1") == "1" if direct is None else direct
        cache = getattr(getattr(engine, "runner", None), "kv_cache", None)
        self.server = KVServer(engine.export_kv, engine.release_kv, lock, f"tcp://{host}:*", mode,
                               direct=(cache, self._locate) if cache is not None else None)
        self.addr = self.server.addr
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="kv-fetch")
        self.done: queue.Queue[FetchResult] = queue.Queue()
        self.counters = TransferCounters()
        self.fail_next = 0            # test hook: inject this many transfer failures
        self.inflight = 0             # fetches started and not yet collected by completed()

    def _locate(self, request_id: str, start_block: int) -> tuple[dict, list[int], bool]:
        """What `engine.export_kv` would copy, without copying: the header, the block ids, and whether the
        request is held (its KV final: safe to read without the engine lock; see KVServer)."""
        eng = self.engine
        held = eng.held.get(request_id)
        req = held or eng.requests.get(request_id)
        if req is None:
            raise KeyError(request_id)
        n = req.num_computed_tokens
        head = {"request_id": request_id, "num_tokens": n, "block_size": eng.kv.block_size,
                "start_block": start_block, "prompt_token_ids": list(req.prompt_token_ids),
                "output_token_ids": list(req.output_token_ids)}
        return head, list(req.block_table[start_block:eng.kv.blocks_needed(n)]), held is not None

    def start_fetch(self, item, prompt_token_ids: list[int], source_addr: str, source_request_id: str) -> None:
        self.inflight += 1
        self.pool.submit(self._fetch, item, prompt_token_ids, source_addr, source_request_id)

    def _fetch(self, item, prompt, addr, rid) -> None:
        t0 = time.perf_counter()
        try:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise RuntimeError("injected transfer failure")
            # without the engine lock, which the worker loop re-takes back to back (Python locks are not
            # fair): fetches while serving averaged ~50 ms on two H200s against 3-6 ms alone, and this wait
            # is the likely part (not yet re-measured). The count is a read of the prefix-cache dict; if
            # the blocks it counts are evicted before the import, the import recomputes instead.
            start = self.engine.prefix_hit_tokens(prompt) // self.engine.config.block_size
            device = getattr(getattr(self.engine, "runner", None), "device", "cpu")
            got = fetch_kv(addr, rid, start, self.timeout_s, device=device, direct=self.direct)
            if got is None:
                raise RuntimeError("fetch failed or timed out")
            kv, ack = got
            n = kv.data.numel() * kv.data.element_size()
            self.done.put(FetchResult(item, kv, ack, time.perf_counter() - t0, n))
        except Exception as e:  # noqa: BLE001 - any failure means recompute
            log.warning("KV fetch of %s from %s failed (%s); decode worker will prefill itself", rid, addr, e)
            self.done.put(FetchResult(item, None, None, time.perf_counter() - t0, 0, reason=str(e)))

    def ack(self, ack) -> None:
        """Tell the source to free its held copy, off the caller's thread (the worker loop must not wait
        for a round trip to another worker)."""
        self.pool.submit(ack)

    def completed(self) -> list[FetchResult]:
        """Fetches that finished since the last call; also frees KV our peers acked. Call with the lock held."""
        self.server.release_pending()
        out = []
        while True:
            try:
                r = self.done.get_nowait()
            except queue.Empty:
                return out
            self.inflight -= 1
            c = self.counters
            if r.kv is None:
                c.fallbacks += 1
                c.fallback_reasons[r.reason] = c.fallback_reasons.get(r.reason, 0) + 1
            else:
                c.fetched += 1
                c.bytes += r.nbytes
                c.seconds += r.seconds
            out.append(r)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.server.close()
