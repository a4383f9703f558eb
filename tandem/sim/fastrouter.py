"""`IndexedKvRouter`: `tandem.router.KvRouter` with the same decisions in O(log W) per request.

`KvRouter.select` scores every candidate worker, and each score sums over all requests in flight on
that worker (`prefill_blocks`, `active_blocks`): O(requests in flight in the whole cluster) per
routing decision, ~0.3 ms at 8 workers and tens of ms at 1,000. This subclass keeps the router's
data and rules and adds:

* running sums for `prefill_blocks` / `active_blocks` (updated in on_assign / on_first_token /
  on_tokens / on_finish / update_load, read through the same properties);
* per pool a lazy heap of (full?, cost without the request's own terms, last_pick, worker_id),
  each entry packed into one int (`_entry`: the heap then compares ints, not tuples):
  for a request of P prompt blocks, cost(w) = overlap_weight * P + [overlap_weight * prefill_blocks(w)
  + decode_weight * active_blocks(w)] - overlap_weight * overlap(w), so the best worker is either the
  heap top or a worker holding the prompt's first block. Those come from an index of block hash ->
  workers kept by the `cached` dicts themselves.

The choice is exactly `KvRouter.select`'s (lowest cost; workers at their request cap or with a
nearly full KV cache only when all are; ties by least recently picked, then id) whenever costs are
integers and compare with a tolerance below 1 (the defaults: weights 1.0, tie_tolerance 0.5,
temperature 0). Otherwise, and for round-robin / least-loaded, it calls the base class.

Without the index (`index=False`: no request shares a block) the `cached` dicts stay empty: no
decision reads them then.

Index scope: hashes >= `unique_from` (the simulator's per-request blocks, which no other request can
match) are not indexed; a request whose first block is such a hash has no overlap anywhere.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any, Iterable, Sequence, cast
import tandem.router.kv_router as _kr
from tandem._compiled import mypyc_attr
from tandem.router.kv_router import KvRouter, NoWorkers, RouterConfig, WorkerView, _Active, pool_roles

_MISSING = object()
_POOLS_OF = {"both": ("both", "prefill", "decode"), "prefill": ("prefill",), "decode": ("decode",)}


@mypyc_attr(native_class=False)        # a dict subclass: a regular class even when compiled
class _IndexedCache(OrderedDict):
    """A worker's `cached` dict that keeps a global hash -> {worker ids} index up to date."""

    def __init__(self, index: dict, wid: str, unique_from: int):
        super().__init__()
        self._index = index
        self._wid = wid
        self._uf = unique_from

    def __setitem__(self, h, v):
        if h < self._uf and h not in self:
            s = self._index.get(h)
            if s is None:
                self._index[h] = {self._wid}
            else:
                s.add(self._wid)
        OrderedDict.__setitem__(self, h, v)

    def _unindex(self, h):
        if h < self._uf:
            s = self._index.get(h)
            if s is not None:
                s.discard(self._wid)
                if not s:
                    del self._index[h]

    def __delitem__(self, h):
        OrderedDict.__delitem__(self, h)
        self._unindex(h)

    def pop(self, h, default=_MISSING):
        if h in self:
            v = OrderedDict.pop(self, h)
            self._unindex(h)
            return v
        if default is _MISSING:
            raise KeyError(h)
        return default

    def popitem(self, last=True):
        h, v = OrderedDict.popitem(self, last)
        self._unindex(h)
        return h, v

    def clear(self):
        for h in list(self):
            self._unindex(h)
        OrderedDict.clear(self)


class _IdxView(WorkerView):
    """WorkerView whose loads are running sums (same values as the base properties)."""

    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.local_prefill = 0          # sum of new_blocks of requests not yet prefilled
        self.local_active = 0           # sum of prompt_blocks + output_tokens // block_size
        self.version = 0
        self.rank = 0                   # place in worker-id order (IndexedKvRouter._rank)

    @property
    def prefill_blocks(self) -> int:
        reported = math.ceil(self.reported_waiting_prefill_tokens / max(1, self.block_size))
        return max(self.local_prefill, reported)

    @property
    def active_blocks(self) -> int:
        return max(self.local_active, self.reported_kv_blocks_used)


class IndexedKvRouter(KvRouter):
    def __init__(self, config: RouterConfig | None = None, unique_from: int = 1 << 62, index: bool = True):
        super().__init__(config)
        self._iw = cast("dict[str, _IdxView]", self.workers)   # the same dict, typed: every view is an _IdxView
        self._unique_from = unique_from
        self._indexing = index            # False: every block hash is unique to its request
        self._index: dict[int, set] = {}
        self._heaps: dict[str, list] = {}  # only the pools asked for so far
        self._dirty: dict = {}             # id -> worker touched since the last select (insertion ordered)
        self._live = 0
        self._by_rank: list = []            # workers in worker-id order (the heap entries' tie-break)
        self._ranked = False                # False: membership changed since the ranks were given
        wt = self.config.weights
        self._fast = (self.config.mode == "kv" and wt.temperature <= 0 and 0 <= wt.tie_tolerance < 1
                      and float(wt.overlap_weight).is_integer() and float(wt.decode_weight).is_integer()
                      and wt.overlap_weight >= 0 and wt.decode_weight >= 0)
        # Without the index every prompt block is unique to its request, and the fast path never
        # reads the `cached` dicts: keeping them (one LRU entry per prompt block and worker) is pure cost.
        self._track_cache = index or not self._fast

    # ------------------------------------------------------------------ membership
    def add_worker(self, worker_id: str, role: str = "both", block_size: int = 16, num_kv_blocks: int = 0,
                   max_num_seqs: int = 256) -> WorkerView:
        if worker_id not in self.workers:
            w = _IdxView(worker_id)
            if self._indexing:
                w.cached = _IndexedCache(self._index, worker_id, self._unique_from)
            self._iw[worker_id] = w
            self._ranked = False
        super().add_worker(worker_id, role, block_size, num_kv_blocks, max_num_seqs)
        w = self._iw[worker_id]
        self._touch(w)
        return w

    def remove_worker(self, worker_id: str) -> None:
        w = self._iw.get(worker_id)
        if w is not None:
            w.cached.clear()
            w.version += 1
            self._ranked = False
        super().remove_worker(worker_id)

    def set_role(self, worker_id: str, role: str) -> None:
        super().set_role(worker_id, role)
        w = self._iw.get(worker_id)
        if w is not None:
            self._touch(w)

    def set_alive(self, worker_id: str, alive: bool) -> None:
        w = self._iw.get(worker_id)
        if w is not None:
            w.alive = alive
            self._touch(w)

    # ------------------------------------------------------------------ updates
    def apply_kv_events(self, worker_id: str, stored, evicted) -> None:
        if self._track_cache:
            super().apply_kv_events(worker_id, stored, evicted)

    def update_load(self, worker_id: str, stats: dict) -> None:
        super().update_load(worker_id, stats)
        w = self._iw.get(worker_id)
        if w is not None:
            self._touch(w)

    def on_assign(self, worker_id: str, request_id: str, hashes: Sequence[int], prompt_len: int,
                  overlap: int | None = None) -> None:
        w = self._iw.get(worker_id)
        if w is None:
            return
        old = w.active.get(request_id)
        if old is not None:
            self._drop(w, old)
        if self._track_cache:
            super().on_assign(worker_id, request_id, hashes, prompt_len, overlap)
            a = w.active[request_id]
        else:                      # the base class without its per-block cache prediction (unread)
            pblocks = -(-prompt_len // max(1, w.block_size))
            a = w.active[request_id] = _Active(pblocks, max(0, pblocks - (overlap or 0)))
            w.assigned_total += 1
        w.local_prefill += a.new_blocks
        w.local_active += a.prompt_blocks
        self._touch(w)

    def on_first_token(self, worker_id: str, request_id: str) -> None:
        w = self._iw.get(worker_id)
        if w is None:
            return
        a = w.active.get(request_id)
        if a is not None and not a.prefilled:
            a.prefilled = True
            w.local_prefill -= a.new_blocks
            self._touch(w)

    def on_tokens(self, worker_id: str, request_id: str, num_output_tokens: int) -> None:
        w = self._iw.get(worker_id)
        if w is None:
            return
        a = w.active.get(request_id)
        if a is not None:
            bs = max(1, w.block_size)
            if not a.prefilled:
                w.local_prefill -= a.new_blocks
            w.local_active += num_output_tokens // bs - a.output_tokens // bs
            a.prefilled = True
            a.output_tokens = num_output_tokens
            self._touch(w)

    def on_finish(self, worker_id: str, request_id: str) -> None:
        w = self._iw.get(worker_id)
        if w is None:
            return
        a = w.active.pop(request_id, None)
        if a is not None:
            self._drop(w, a)
            self._touch(w)

    def _drop(self, w: _IdxView, a) -> None:
        if not a.prefilled:
            w.local_prefill -= a.new_blocks
        w.local_active -= a.prompt_blocks + a.output_tokens // max(1, w.block_size)

    # ------------------------------------------------------------------ heaps
    def _key(self, w: _IdxView) -> tuple:
        """(is_full, cost without the request's terms, last_pick, id): the base properties inlined
        (this runs for every load change of every worker)."""
        wt = self.config.weights
        bs = w.block_size if w.block_size > 1 else 1
        pf = -(-w.reported_waiting_prefill_tokens // bs)          # ceil, as prefill_blocks
        if w.local_prefill > pf:
            pf = w.local_prefill
        ab = w.reported_kv_blocks_used
        nkv = w.num_kv_blocks
        full = len(w.active) >= w.max_num_seqs or (ab / nkv if nkv else 0.0) >= self.config.full_kv_usage
        if w.local_active > ab:
            ab = w.local_active
        return (full, wt.overlap_weight * pf + wt.decode_weight * ab, w.last_pick, w.worker_id)

    def _entry(self, w: _IdxView) -> int:
        """A heap entry: `_key(w)` + (version,) packed into one int, fields from the most significant:
        full (1 bit), cost (64 bits; an integer >= 0 on the fast path), last_pick (48), the worker's
        rank in worker-id order (24; ids are unique, so ranks order as the ids do), version (48).
        Ints compare in one call where the tuples took one per field."""
        full, cost, last_pick, _ = self._key(w)
        return ((((int(full) << _CB | int(cost)) << _PB | last_pick) << _RB | w.rank) << _VB) | w.version

    @staticmethod
    def _unpack(e: int, w: _IdxView) -> tuple:
        """`_key(w)` of w's heap entry e."""
        e >>= _VB + _RB
        return (bool(e >> (_PB + _CB)), (e >> _PB) & _CM, e & _PM, w.worker_id)

    def _rank(self) -> None:
        """Ranks in worker-id order, after a membership change (every heap entry is rebuilt)."""
        self._by_rank = [self.workers[wid] for wid in sorted(self.workers)]
        for i, w in enumerate(self._by_rank):
            w.rank = i
        self._ranked = True

    def _touch(self, w: _IdxView) -> None:
        """w's key may have changed. Its heap entry is pushed lazily, at the next `select`: a worker
        touched several times between two decisions (assign, first token, finish, load report) gets
        one entry, holding the same key the last eager push would have held."""
        if not self._fast:
            return
        w.version += 1
        if self._heaps:
            self._dirty[w.worker_id] = w

    def _flush(self) -> None:
        heaps = self._heaps
        for w in self._dirty.values():
            if not w.alive:
                continue
            entry = self._entry(w)
            for p in _POOLS_OF.get(w.role, ()):
                h = heaps.get(p)
                if h is not None:
                    heapq.heappush(h, entry)
                    self._live += 1
        self._dirty.clear()
        if self._live > 24 * max(16, len(self.workers)):
            self._rebuild()

    def _rebuild(self, add_pool: str | None = None) -> None:
        if not self._ranked:
            self._rank()
        pools = set(self._heaps)
        if add_pool is not None:
            pools.add(add_pool)
        self._heaps = {p: [] for p in pools}
        self._dirty.clear()
        self._live = 0
        for w in self._iw.values():
            if w.alive:
                entry = self._entry(w)
                for p in _POOLS_OF.get(w.role, ()):
                    if p in self._heaps:
                        self._heaps[p].append(entry)
                        self._live += 1
        for h in self._heaps.values():
            heapq.heapify(h)

    def _valid(self, entry, roles) -> bool:
        w = self._by_rank[(entry >> _VB) & _RM]
        return entry & _VM == w.version and w.alive and w.role in roles and self._iw.get(w.worker_id) is w

    # ------------------------------------------------------------------ selection
    def select(self, hashes: Sequence[int], prompt_len: int, pool: str = "both",
               exclude: Iterable[str] = ()) -> tuple[str, int]:
        if not self._fast:
            return super().select(hashes, prompt_len, pool, exclude)
        roles = pool_roles(pool)
        ex = set(exclude) if exclude else ()
        heap = self._heaps.get(pool)
        if heap is None or not self._ranked:        # a new pool, or worker ranks to give again
            self._rebuild(pool)
            heap = self._heaps[pool]
        elif self._dirty:
            self._flush()
            heap = self._heaps[pool]
        # the best worker without counting overlap: the first valid, non-excluded heap entry
        skipped = []
        top = None
        by_rank = self._by_rank
        pop = heapq.heappop
        while heap:
            e = heap[0]
            w = by_rank[(e >> _VB) & _RM]             # self._valid(e, roles), inlined (ranks are
            if not (e & _VM == w.version and w.alive and w.role in roles):   # current: members only)
                pop(heap)
                self._live -= 1
                continue
            if w.worker_id in ex:
                skipped.append(pop(heap))
                continue
            top = e
            break
        for e in skipped:
            heapq.heappush(heap, e)
        if top is None:
            raise NoWorkers(f"no live worker serves pool {pool!r}")
        wt = self.config.weights
        full = self.config.full_kv_usage
        best_w = w
        best_ov = 0
        pblocks_of: dict[Any, int] = {}
        best = None
        max_ov = 0
        if hashes and self._indexing:
            holders = self._index.get(hashes[0])
            if holders:
                now = _now()
                best = self._unpack(top, best_w)
                for wid in sorted(holders):
                    w = self._iw.get(wid)
                    if w is None or not w.alive or w.role not in roles or wid in ex:
                        continue
                    pb = pblocks_of.get(w.block_size)
                    if pb is None:
                        pb = pblocks_of[w.block_size] = math.ceil(prompt_len / max(1, w.block_size))
                    ov = min(w.overlap(hashes, now), pb)
                    if ov <= 0:
                        continue
                    max_ov = max(max_ov, ov)
                    cost = wt.overlap_weight * (w.prefill_blocks - ov) + wt.decode_weight * w.active_blocks
                    k = (w.is_full(full), cost, w.last_pick, wid)
                    if k < best:
                        best, best_w, best_ov = k, w, ov
        self._picks += 1
        kind = "kv_hit" if best_ov and best_ov == max(max_ov, best_ov) else ("load" if max_ov else "kv_miss")
        wid, ov = self._chose(best_w, best_ov, kind)
        self._touch(best_w)
        return wid, ov


_VB, _RB, _PB, _CB = 48, 24, 48, 64      # bit widths in a heap entry: version, rank, last_pick, cost
_VM, _RM, _PM, _CM = (1 << _VB) - 1, (1 << _RB) - 1, (1 << _PB) - 1, (1 << _CB) - 1


def _now() -> float:
    return _kr.time.monotonic()          # the module's clock (virtual time inside a simulation)
