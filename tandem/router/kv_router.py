"""KV-aware router.

For each request the router knows the prompt's chained block hashes (`tandem.common.hashing`, the
same hashes the engines' prefix caches use) and, per worker:
  * the set of block hashes cached there, from the KV events workers publish (stored / evicted),
    plus hashes it predicts will be cached because it just sent a prompt there (expire unless
    confirmed by an event);
  * its load, counted locally and exactly from the requests this router has in flight there:
    `prefill_blocks` (uncached prompt blocks of requests still waiting for their first token) and
    `active_blocks` (context blocks of all its active requests) — so a burst that arrives between two
    status reports already sees the work it just assigned (Dynamo issue #737: a shared system prompt
    must not send everything to the one worker that cached it first);
  * the load the worker itself reports (other frontends' work), used as a floor.

Cost of worker w for a request of P prompt blocks of which w has O cached (a prefix match):

    cost(w) = overlap_weight * (P - O + prefill_blocks(w)) + decode_weight * active_blocks(w)

(prefill work it would do, cache-aware, plus the decode load it carries; the Dynamo formula). The
lowest cost wins; ties (within `tie_tolerance` blocks) go round robin. With `temperature` > 0 the
choice is sampled from softmax(-cost / (temperature * scale)) instead. A worker at its request cap or
with a nearly full KV cache is only chosen when every worker is. Modes `round-robin` and
`least-loaded` ignore the cache.

Pools: `select(..., pool="both"|"prefill"|"decode")` chooses among workers whose role serves that
pool (`both` workers serve every pool).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from tandem.common.hashing import block_hashes

MODES = ("kv", "round-robin", "least-loaded")
POOLS = ("both", "prefill", "decode")


def pool_roles(pool: str) -> tuple[str, ...]:
    """Worker roles that can take work of `pool`."""
    if pool == "both":
        return ("both",)
    if pool == "prefill":
        return ("prefill", "both")
    if pool == "decode":
        return ("decode", "both")
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


@dataclass
class RouterWeights:
    overlap_weight: float = 1.0     # weight of prefill work (new uncached blocks + queued prefill blocks)
    decode_weight: float = 1.0      # weight of active decode blocks
    temperature: float = 0.0        # 0: argmin (round-robin among ties); > 0: softmax sampling
    tie_tolerance: float = 0.5      # costs within this many blocks count as a tie


@dataclass
class RouterConfig:
    mode: str = "kv"
    weights: RouterWeights = field(default_factory=RouterWeights)
    predict_ttl_s: float = 10.0     # predicted (unconfirmed) cached blocks expire after this
    full_kv_usage: float = 0.95     # a worker above this KV usage counts as full
    seed: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"router mode must be one of {MODES}, got {self.mode!r}")


@dataclass
class _Active:
    prompt_blocks: int
    new_blocks: int          # uncached prompt blocks (prefill work)
    prefilled: bool = False
    output_tokens: int = 0


@dataclass
class WorkerView:
    """What the router knows about one worker."""
    worker_id: str
    role: str = "both"
    block_size: int = 16
    num_kv_blocks: int = 0
    max_num_seqs: int = 256
    alive: bool = True
    # cached block hash -> 0.0 (confirmed by a KV event) or expiry time (predicted)
    cached: "OrderedDict[int, float]" = field(default_factory=OrderedDict)
    active: dict[str, _Active] = field(default_factory=dict)
    # last reported by the worker
    reported_waiting_prefill_tokens: int = 0
    reported_kv_blocks_used: int = 0
    reported_running: int = 0
    reported_waiting: int = 0
    assigned_total: int = 0
    last_pick: int = 0

    # -------------------------------------------------------------- derived load
    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def prefill_blocks(self) -> int:
        local = sum(a.new_blocks for a in self.active.values() if not a.prefilled)
        reported = math.ceil(self.reported_waiting_prefill_tokens / max(1, self.block_size))
        return max(local, reported)

    @property
    def active_blocks(self) -> int:
        bs = max(1, self.block_size)
        local = sum(a.prompt_blocks + a.output_tokens // bs for a in self.active.values())
        return max(local, self.reported_kv_blocks_used)

    @property
    def kv_usage(self) -> float:
        return self.reported_kv_blocks_used / self.num_kv_blocks if self.num_kv_blocks else 0.0

    def is_full(self, full_kv_usage: float) -> bool:
        return self.num_active >= self.max_num_seqs or self.kv_usage >= full_kv_usage

    def cache_capacity(self) -> int:
        return max(1024, 2 * self.num_kv_blocks)

    def overlap(self, hashes: Sequence[int], now: float) -> int:
        """Number of leading prompt blocks cached here."""
        n = 0
        cached = self.cached
        for h in hashes:
            v = cached.get(h)
            if v is None or (v and v < now):
                break
            n += 1
        return n


def kv_cost(prompt_blocks: int, overlap_blocks: int, prefill_blocks: int, active_blocks: int,
            weights: RouterWeights) -> float:
    """The KV-aware cost of sending a request to a worker (lower is better); see the module docstring."""
    new = max(0, prompt_blocks - overlap_blocks)
    return weights.overlap_weight * (new + prefill_blocks) + weights.decode_weight * active_blocks


class NoWorkers(Exception):
    """No live worker serves the requested pool."""


class KvRouter:
    def __init__(self, config: RouterConfig | None = None):
        self.config = config or RouterConfig()
        self.workers: dict[str, WorkerView] = {}
        self._rng = random.Random(self.config.seed)
        self._rr = 0
        self._picks = 0
        self.decisions = {"kv_hit": 0, "kv_miss": 0, "load": 0}

    # -------------------------------------------------------------- membership
    def add_worker(self, worker_id: str, role: str = "both", block_size: int = 16, num_kv_blocks: int = 0,
                   max_num_seqs: int = 256) -> WorkerView:
        w = self.workers.get(worker_id)
        if w is None:
            w = self.workers[worker_id] = WorkerView(worker_id)
        w.role, w.block_size, w.num_kv_blocks, w.max_num_seqs, w.alive = (
            role, block_size, num_kv_blocks, max_num_seqs, True)
        return w

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def set_role(self, worker_id: str, role: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].role = role

    # -------------------------------------------------------------- updates from workers
    def apply_kv_events(self, worker_id: str, stored: Iterable[int], evicted: Iterable[int]) -> None:
        w = self.workers.get(worker_id)
        if w is None:
            return
        c = w.cached
        for h in evicted:
            c.pop(h, None)
        for h in stored:
            c[h] = 0.0
            c.move_to_end(h)
        cap = w.cache_capacity()
        while len(c) > cap:
            c.popitem(last=False)

    def update_load(self, worker_id: str, stats: dict) -> None:
        w = self.workers.get(worker_id)
        if w is None:
            return
        w.reported_waiting_prefill_tokens = int(stats.get("waiting_prefill_tokens", 0) or 0)
        w.reported_kv_blocks_used = int(stats.get("kv_blocks_used", 0) or 0)
        w.reported_running = int(stats.get("num_running", 0) or 0)
        nw = stats.get("num_waiting") or {}
        w.reported_waiting = int(sum(nw.values())) if isinstance(nw, dict) else int(nw)
        if stats.get("kv_blocks_total"):
            w.num_kv_blocks = int(stats["kv_blocks_total"])

    # -------------------------------------------------------------- request lifecycle
    def on_assign(self, worker_id: str, request_id: str, hashes: Sequence[int], prompt_len: int,
                  overlap: int | None = None) -> None:
        """Count the request as in flight on the worker and predict its prompt blocks as cached there."""
        w = self.workers.get(worker_id)
        if w is None:
            return
        now = time.monotonic()
        if overlap is None:
            overlap = w.overlap(hashes, now)
        bs = max(1, w.block_size)
        pblocks = math.ceil(prompt_len / bs)
        w.active[request_id] = _Active(pblocks, max(0, pblocks - overlap))
        w.assigned_total += 1
        exp = now + self.config.predict_ttl_s
        c = w.cached
        for h in hashes:
            if c.get(h, 1.0) != 0.0:      # keep confirmed entries confirmed
                c[h] = exp
            c.move_to_end(h)
        cap = w.cache_capacity()
        while len(c) > cap:
            c.popitem(last=False)

    def on_first_token(self, worker_id: str, request_id: str) -> None:
        w = self.workers.get(worker_id)
        a = w.active.get(request_id) if w else None
        if a is not None:
            a.prefilled = True

    def on_tokens(self, worker_id: str, request_id: str, num_output_tokens: int) -> None:
        w = self.workers.get(worker_id)
        a = w.active.get(request_id) if w else None
        if a is not None:
            a.prefilled = True
            a.output_tokens = num_output_tokens

    def on_finish(self, worker_id: str, request_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.active.pop(request_id, None)

    # -------------------------------------------------------------- selection
    def candidates(self, pool: str = "both", exclude: Iterable[str] = ()) -> list[WorkerView]:
        roles = pool_roles(pool)
        ex = set(exclude)
        return [w for w in self.workers.values() if w.alive and w.role in roles and w.worker_id not in ex]

    def hashes_for(self, token_ids: Sequence[int]) -> list[int]:
        """Block hashes of a prompt, with the block size of the workers (all workers share one)."""
        bs = next((w.block_size for w in self.workers.values()), 16)
        return block_hashes(token_ids, bs)

    def scores(self, hashes: Sequence[int], prompt_len: int, pool: str = "both",
               exclude: Iterable[str] = ()) -> dict[str, tuple[float, int]]:
        """worker_id -> (cost, overlap blocks) for every candidate (KV mode's view)."""
        now = time.monotonic()
        out = {}
        for w in self.candidates(pool, exclude):
            pblocks = math.ceil(prompt_len / max(1, w.block_size))
            ov = min(w.overlap(hashes, now), pblocks)
            out[w.worker_id] = (kv_cost(pblocks, ov, w.prefill_blocks, w.active_blocks, self.config.weights), ov)
        return out

    def select(self, hashes: Sequence[int], prompt_len: int, pool: str = "both",
               exclude: Iterable[str] = ()) -> tuple[str, int]:
        """Choose a worker; returns (worker_id, overlap blocks there). Raises NoWorkers."""
        cands = self.candidates(pool, exclude)
        if not cands:
            raise NoWorkers(f"no live worker serves pool {pool!r}")
        full = self.config.full_kv_usage
        roomy = [w for w in cands if not w.is_full(full)]
        if roomy:
            cands = roomy
        self._picks += 1
        mode = self.config.mode
        if mode == "round-robin":
            cands.sort(key=lambda w: w.worker_id)
            w = cands[self._rr % len(cands)]
            self._rr += 1
            return self._chose(w, 0, None)
        if mode == "least-loaded":
            costs = {w.worker_id: float(w.num_active + w.reported_waiting) for w in cands}
            return self._chose(self._argmin(cands, costs, 0.0), 0, None)
        now = time.monotonic()
        costs, overlaps = {}, {}
        for w in cands:
            pblocks = math.ceil(prompt_len / max(1, w.block_size))
            ov = min(w.overlap(hashes, now), pblocks)
            overlaps[w.worker_id] = ov
            costs[w.worker_id] = kv_cost(pblocks, ov, w.prefill_blocks, w.active_blocks, self.config.weights)
        wt = self.config.weights
        if wt.temperature > 0 and len(cands) > 1:
            w = self._softmax_pick(cands, costs, wt.temperature)
        else:
            w = self._argmin(cands, costs, wt.tie_tolerance)
        best_ov = max(overlaps.values())
        return self._chose(w, overlaps[w.worker_id], "kv_hit" if overlaps[w.worker_id] and
                           overlaps[w.worker_id] == best_ov else ("load" if best_ov else "kv_miss"))

    def _chose(self, w: WorkerView, overlap: int, kind: str | None) -> tuple[str, int]:
        w.last_pick = self._picks
        if kind:
            self.decisions[kind] += 1
        return w.worker_id, overlap

    @staticmethod
    def _argmin(cands: list[WorkerView], costs: dict[str, float], tol: float) -> WorkerView:
        best = min(costs.values())
        tied = [w for w in cands if costs[w.worker_id] <= best + tol]
        # round robin among ties: the one picked longest ago (then by id, deterministic)
        return min(tied, key=lambda w: (w.last_pick, w.worker_id))

    def _softmax_pick(self, cands: list[WorkerView], costs: dict[str, float], temperature: float) -> WorkerView:
        vals = [costs[w.worker_id] for w in cands]
        scale = max(1.0, (max(vals) - min(vals)))
        lo = min(vals)
        ps = [math.exp(-(v - lo) / (temperature * scale)) for v in vals]
        r = self._rng.random() * sum(ps)
        for w, p in zip(cands, ps):
            r -= p
            if r <= 0:
                return w
        return cands[-1]

    # -------------------------------------------------------------- introspection
    def snapshot(self) -> dict:
        return {
            "mode": self.config.mode,
            "weights": dataclasses.asdict(self.config.weights),
            "decisions": dict(self.decisions),
            "workers": {wid: {"role": w.role, "active_requests": w.num_active, "prefill_blocks": w.prefill_blocks,
                              "active_blocks": w.active_blocks, "cached_blocks_known": len(w.cached),
                              "assigned_total": w.assigned_total}
                        for wid, w in self.workers.items()},
        }
