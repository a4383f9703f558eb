"""CUDA graphs for decode steps, one per batch-size bucket (model forward + logits).

A decode step of B sequences runs the graph of the smallest captured bucket >= B; rows B..bucket-1
are padding: they read and write a scratch KV block that the block pool never hands out (the runner
allocates one extra block for it), so padding never touches a real request's cache.

Per step the host sends one small pinned int64 array (token ids, positions, slots, sequence lengths,
block-table rows: 5 x bucket) with one async copy. Block tables live on the GPU in a persistent
table of rows, one row per running request, updated incrementally: a decode step normally uploads
nothing, or the one block a request just grew by (building a [B, max_blocks] table from Python lists
every step costs milliseconds at large batch). Inside the graph the batch's rows are gathered into
the [bucket, max_blocks] block table the attention kernel reads.

A request's row is tracked on the request object (`_graph_bt` = (block_table list, synced length,
row)); the KV manager replaces the list object whenever a table is reset (free, preemption, prefix
match), so a stale row is detected by identity. Rows of requests that left the batch are reclaimed
when the free list runs dry.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tandem.engine.attention import AttnMetadata
from tandem.engine.hostcopy import to_device

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                   320, 384, 448, 512)


class DecodeGraphRunner:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_model_len: int, max_batch: int,
                 scratch_block: int, buckets=DEFAULT_BUCKETS):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.max_batch = self.buckets[-1]
        self.scratch_slot = scratch_block * block_size
        dev = self.device
        # persistent block-table rows; the last row is the padding row (all scratch block)
        self.num_rows = 2 * self.max_batch + 1
        self.scratch_row = self.num_rows - 1
        self.bt_store = torch.zeros(self.num_rows, self.max_blocks, dtype=torch.int32, device=dev)
        self.bt_store[self.scratch_row].fill_(scratch_block)
        self.row_owner: list = [None] * (self.num_rows - 1)
        self.free_rows = list(range(self.num_rows - 2, -1, -1))
        self.staging = torch.zeros(5, self.max_batch, dtype=torch.int64, device=dev)
        self._pinned = [torch.zeros(5, self.max_batch, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._np = [p.numpy() for p in self._pinned]
        self._events = [None, None]
        self._flip = 0
        self.qsl = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0
        self._set_padding(0, self.max_batch)

    # ------------------------------------------------------------------ capture
    def _set_padding(self, lo: int, hi: int) -> None:
        self.staging[0, lo:hi] = 0
        self.staging[1, lo:hi] = 0
        self.staging[2, lo:hi] = self.scratch_slot
        self.staging[3, lo:hi] = 1
        self.staging[4, lo:hi] = self.scratch_row

    def _forward(self, B: int) -> torch.Tensor:
        st = self.staging[:, :B]
        meta = AttnMetadata(
            query_start_loc=self.qsl[:B + 1], seq_lens=st[3].to(torch.int32),
            block_tables=self.bt_store.index_select(0, st[4]), slot_mapping=st[2],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(B + 1)), seq_lens_cpu=[1] * B, block_tables_cpu=[[0]] * B)
        hidden = self.model(st[0], st[1], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)
        for B in reversed(self.buckets):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(B)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._forward(B)
            self.graphs[B] = g
            self.outputs[B] = out
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch %d..%d) in %.1fs", len(self.graphs), self.buckets[0],
                 self.buckets[-1], self.capture_s)

    # ------------------------------------------------------------------ run
    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _row_for(self, req, current: set[int], ups: tuple[list, list, list]) -> int:
        table = req.block_table
        st = getattr(req, "_graph_bt", None)
        if st is not None and st[0] is table and self.row_owner[st[2]] is req:
            _, synced, row = st
        else:
            if not self.free_rows:
                self._reclaim(current)
            row, synced = self.free_rows.pop(), 0
            self.row_owner[row] = req
        n = len(table)
        if n > synced:
            ups[0].extend([row] * (n - synced))
            ups[1].extend(range(synced, n))
            ups[2].extend(table[synced:n])
        req._graph_bt = (table, n, row)
        return row

    def _reclaim(self, current: set[int]) -> None:
        for row, owner in enumerate(self.row_owner):
            if owner is not None and id(owner) not in current:
                owner._graph_bt = None
                self.row_owner[row] = None
                self.free_rows.append(row)

    def run(self, reqs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for `reqs`, each computing position `num_computed_tokens`: logits
        [len(reqs), vocab]. The token ids come from the requests, or from `input_ids` (on the device:
        the previous step's sampled ids, not on the host yet) under asynchronous scheduling."""
        B = len(reqs)
        bucket = self.bucket_for(B)
        i = self._flip
        self._flip ^= 1
        if self._events[i] is not None:
            self._events[i].synchronize()            # pinned buffer i is free again
        buf = self._np[i]
        current = {id(r) for r in reqs}
        ups: tuple[list, list, list] = ([], [], [])
        bs = self.block_size
        for j, req in enumerate(reqs):
            p = req.num_computed_tokens
            buf[0, j] = req.all_token_ids[p] if input_ids is None else 0
            buf[1, j] = p
            buf[2, j] = req.block_table[p // bs] * bs + p % bs
            buf[3, j] = p + 1
            buf[4, j] = self._row_for(req, current, ups)
        if bucket > B:
            buf[0:2, B:bucket] = 0
            buf[2, B:bucket] = self.scratch_slot
            buf[3, B:bucket] = 1
            buf[4, B:bucket] = self.scratch_row
        if ups[0]:
            u = to_device(ups, torch.int64, self.device)
            self.bt_store[u[0], u[1]] = u[2].to(torch.int32)
        self.staging[:, :bucket].copy_(self._pinned[i][:, :bucket], non_blocking=True)
        if input_ids is not None:
            self.staging[0, :B].copy_(input_ids)
        ev = self._events[i] or torch.cuda.Event()
        ev.record()
        self._events[i] = ev
        self.graphs[bucket].replay()
        return self.outputs[bucket][:B]
