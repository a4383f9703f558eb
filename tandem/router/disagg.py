"""Conditional disaggregation: where a request's prompt is prefilled. One rule, used by the frontend
(`tandem.frontend.client`) and the simulator (`tandem.sim.cluster`), so a sim run routes as the
server does.

A prompt is prefilled on the decode worker itself when that is cheaper than a remote prefill plus a
KV transfer: its uncached part is short, or the prefill worker it would go to has a queue more than
`prefill_queue_factor` times what the decode worker has to prefill, this prompt included. The factor
is the speed ratio: a decode worker prefills in the room its decodes leave.

A `batch` prompt is sent to a decode worker for a long queue only with `spill_batch`, meant for decode
workers whose steps cap the prompt tokens they carry next to decodes (the engine's
`prefill_chunk_while_decoding`): uncapped, a 3k-token prompt stalls every chat decode on the worker (a
summarization flood on two H200s, docs/benchmarks.md). That is when it pays: at a chat →
summarization swing the prompts queue on a prefill pool sized for chat while the decode pool's
steps have room (docs/planner.md, session 9).

A `batch` request with a short answer (max_tokens <= batch_on_prefill_max_tokens) is served whole on
its prefill worker: its KV (375 MB for a 3k-token 8B prompt) is not worth moving for a few hundred
tokens, and its decode would share the decode workers' steps with chat (on two H200s it doubled chat
TPOT). Its decode rows ride along in the prefill worker's chunked steps, so its TPOT is that of a
prefill step: 0 turns the rule off (the server does so when it is given a TPOT SLO to meet)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class DisaggPolicy:
    local_prefill_max_tokens: int = 256        # uncached prompt tokens at or below this: prefill locally
    prefill_queue_factor: float = 4.0          # local when the prefill queue > factor x decode worker's (0: never)
    batch_on_prefill_max_tokens: int = 256     # batch requests with max_tokens <= this stay on the prefill pool
    spill_batch: bool = False                  # a long prefill queue also sends batch prompts to decode workers

    def __post_init__(self) -> None:
        if self.local_prefill_max_tokens < 0 or self.batch_on_prefill_max_tokens < 0:
            raise ValueError("local_prefill_max_tokens and batch_on_prefill_max_tokens must be >= 0")
        if self.prefill_queue_factor < 0:
            raise ValueError(f"prefill_queue_factor must be >= 0, got {self.prefill_queue_factor}")

    def stays_on_prefill(self, priority: str, max_tokens: int | None) -> bool:
        return priority == "batch" and max_tokens is not None and 0 < max_tokens <= self.batch_on_prefill_max_tokens

    def short(self, uncached: int) -> bool:
        return uncached <= self.local_prefill_max_tokens

    @property
    def spills_batch(self) -> bool:
        """Batch prompts can be prefilled on decode workers (the planner then plans for it)."""
        return self.spill_batch and self.prefill_queue_factor > 0

    def may_spill(self, priority: str) -> bool:
        """Whether the queue rule applies to this class at all (it needs the prefill queue's length)."""
        return self.prefill_queue_factor > 0 and (priority != "batch" or self.spill_batch)

    def local_reason(self, uncached: int, priority: str, prefill_queue_tokens: float,
                     decode_queue_tokens: float) -> str | None:
        """Why to prefill on the decode worker, or None for a remote prefill. Queues are prompt tokens
        waiting on the prefill worker the request would go to and on the decode worker."""
        if self.short(uncached):
            return "local_short_uncached"
        if self.may_spill(priority) and \
                prefill_queue_tokens > self.prefill_queue_factor * (decode_queue_tokens + uncached):
            return "local_prefill_queue_long"
        return None

    def queue_reason(self, router: Any, hashes: Sequence[int], prompt_len: int, priority: str, uncached: int,
                     decode_wid: str, exclude: Sequence[str] = ()) -> tuple[str | None, tuple[str, int] | None]:
        """`local_reason` on `router`'s view of the two queues (what it assigned, floored by what the
        workers report): (reason or None, the (prefill worker, overlap) it chose for the comparison, or
        None when the rule does not apply to `priority`). Raises the router's NoWorkers when no
        prefill worker is left."""
        if not self.may_spill(priority):
            return None, None
        pick = router.select(hashes, prompt_len, "prefill", exclude=exclude)
        views = router.workers
        p, d = views[pick[0]], views[decode_wid]
        return self.local_reason(uncached, priority, p.prefill_blocks * max(1, p.block_size),
                                 d.prefill_blocks * max(1, d.block_size)), pick
