"""Continuous-batching scheduler with chunked prefill and priority classes.

Every step orders all live requests (running and waiting) by effective priority (class rank, lowered
by one per `aging_s` waited, so batch work climbs and is never starved), then arrival. It walks that
order handing out the step's token budget: a running decode takes 1 token, a prefill takes what is
left of its prompt up to the remaining budget (chunked prefill mixed with decodes). When KV blocks run
out, the lowest-ordered running request not yet scheduled this step is preempted (recompute: its
blocks are freed and it goes back to waiting). Because higher classes are visited first, a waiting
interactive request is admitted in the very step it arrives even when the batch is full of batch-class
work — the priority inversion of vLLM #40004 cannot happen. A waiting request that cannot get blocks
stops admission of lower waiting ones (no bypass), but running ones keep decoding.

`prefill_chunk_while_decoding` caps the prompt tokens a step may carry next to decodes (Sarathi's
stall-free batching): a decode worker that takes prompts when the prefill pool is backed up
(`tandem.router.disagg`) then keeps its decodes' step time, and so their TPOT, near a pure decode step.

The scheduler owns no tensors; the simulated engine reuses it unchanged.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    reqs: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.reqs)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 aging_s: float = 30.0, clock=time.monotonic, prefill_chunk_while_decoding: int | None = None):
        self.kv = kv
        self.prefill_chunk_while_decoding = prefill_chunk_while_decoding
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.aging_s = aging_s
        self.clock = clock
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._seq = itertools.count()
        self.num_preemptions = 0

    # -- queue management
    def add(self, req: Request) -> None:
        req.seq = next(self._seq)
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and free its blocks (abort / finish)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.hold_kv:
            self.kv.free(req)
        req.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def order_key(self, now: float):
        """key(req) = (effective rank at `now`, arrival, admission seq): the order of every step. The
        effective rank is the class rank less one per `aging_s` waited (the top class, 0, stays)."""
        aging = self.aging_s

        def key(req):
            r = req.rank
            if r and aging > 0:
                r = max(0, r - int((now - req.arrival_time) / aging))
            return (r, req.arrival_time, req.seq)
        return key

    def waiting_prefill_tokens(self) -> int:
        return sum(r.remaining_to_compute for r in self.waiting) + \
            sum(r.remaining_to_compute - 1 for r in self.running if r.remaining_to_compute > 1)

    # -- the step
    def schedule(self, decoding: int = 0) -> ScheduledBatch:
        """The next step's batch. `decoding`: decodes that run in the step outside this scheduler's
        view (the simulated engine's fast-forwarded decode set), for the prompt-chunk cap."""
        now = self.clock()
        order = sorted(self.running + self.waiting, key=self.order_key(now))
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        budget = self.max_num_batched_tokens
        cap = self.prefill_chunk_while_decoding
        pf_left = budget          # prompt tokens this step may still take
        if cap is not None and (decoding or any(r.remaining_to_compute == 1 for r in self.running)):
            pf_left = cap
        admit_waiting = True
        for req in order:
            if budget <= 0 or len(batch.reqs) >= self.max_num_seqs:
                break
            if req.status == Status.FINISHED:       # preempted-then-finished cannot happen; safety
                continue
            was_waiting = req.status == Status.WAITING
            if was_waiting:
                if not admit_waiting:
                    continue
                if req.num_computed_tokens == 0 and not req.block_table:
                    hit = self.kv.match_prefix(req)
                    req.num_computed_tokens = hit
                    req.num_cached_tokens = max(req.num_cached_tokens, min(hit, req.num_prompt_tokens))
            n = min(req.remaining_to_compute, budget)
            if n > 1:
                n = min(n, pf_left)
            if n <= 0:
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self._pick_victim(order, req, scheduled)
                if victim is None:
                    break
                self._preempt(victim, batch)
            else:
                if was_waiting:
                    self.waiting.remove(req)
                    self.running.append(req)
                    req.status = Status.RUNNING
                batch.reqs.append(req)
                batch.num_new_tokens.append(n)
                scheduled.add(id(req))
                budget -= n
                if n > 1 or req.remaining_to_compute > 1:
                    pf_left -= n
                continue
            # could not get blocks
            if was_waiting:
                self._release_unstarted(req)
                admit_waiting = False
            else:
                self._preempt(req, batch)
        return batch

    def _pick_victim(self, order: list[Request], req: Request, scheduled: set[int]) -> Request | None:
        """Lowest-ordered running request, not yet scheduled this step, other than `req`."""
        for cand in reversed(order):
            if cand is req:
                return None                      # everything below req is already scheduled or waiting
            if cand.status == Status.RUNNING and id(cand) not in scheduled and cand.block_table:
                return cand
        return None

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        batch.preempted.append(req)

    def _release_unstarted(self, req: Request) -> None:
        """A waiting request that took prefix-cache blocks but could not be admitted gives them back."""
        if req.block_table:
            self.kv.free(req)
        req.num_computed_tokens = 0
