"""Engine: one worker's inference loop (add/step/abort), vLLM-v1-engine-core style, no HTTP.

`Engine.step()` runs one scheduler step: schedule → one flattened forward over all scheduled tokens
(chunked prefills and decodes together) → sample the sequences whose computed prefix reached their
end → detokenize, apply stop rules, emit deltas. Finished requests free their KV blocks unless
they were added with `hold_kv` (a prefill worker keeps them until the KV is exported).

Asynchronous scheduling (`async_scheduling`, on by default on CUDA): a step's sampled ids stay on the
GPU and the step is left in flight; the next `step()` call first launches the following decode step,
feeding it those ids on the device, and only then waits for the previous ids and does the host work
(detokenize, stop checks, outputs) while the GPU runs. So outputs lag one call. Only the simple case
runs ahead — every running request decoded in the step in flight, nothing waiting (or only requests
the full batch keeps out anyway), no `hold_kv`, the KV blocks fit; anything else first finishes the step in flight and schedules normally
(the scheduler never runs with a step in flight). Requests that will finish by length are left out of
the step run ahead; one that stops on EOS / a stop id or string has one extra token computed that is
dropped (its KV is freed with it; a seeded generator of a finished request is never used again), so
outputs are those of synchronous stepping (bit-exact where the model's numerics do not depend on the
batch size: that extra row can put a step into the next CUDA-graph bucket).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from tandem.common.errors import InvalidParams
from tandem.common.outputs import EngineStats, RequestOutput
from tandem.common.sampling import PRIORITIES, SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.hostcopy import to_device
from tandem.engine.kv_cache import KVCacheManager, check_request_fits, import_kv_blocks
from tandem.engine.request import Request, Status
from tandem.engine.runner import ModelRunner
from tandem.engine.sampler import SampleRow, logprob_dicts, logprob_tensor, sample_ids
from tandem.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class KVExport:
    """A request's computed KV, ready to move to another engine.

    `data` covers blocks [start_block, ...) of the request, shaped [layers, 2, n_blocks, block_size,
    kv_heads, head_dim]; `num_tokens` tokens of `token_ids` are computed (the rest, normally the first
    sampled token, is computed by the importer)."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_tokens: int
    block_size: int
    start_block: int
    data: torch.Tensor


@dataclass
class StepInFlight:
    """A launched step whose sampled ids may not have reached the host yet."""
    reqs: list[Request]                 # the sampled rows, in order
    ids: torch.Tensor                   # sampled token ids on the device, [len(reqs)]
    host: tuple                         # HostIds handle (pinned copy + event)
    rows: list[SampleRow]
    logprobs: tuple | None = None       # HostIds handle of the packed logprobs, when a row wants them


def resolve_async_scheduling(setting: bool | None, device: torch.device) -> bool:
    """None = auto: on for CUDA (hides ~0.3-0.6 ms of host work per decode step), off on CPU, where
    nothing overlaps and it would only delay each output by one step. TANDEM_ASYNC_SCHEDULING=0/1
    overrides the auto choice (tests run the CPU engine with it on)."""
    if setting is not None:
        return bool(setting)
    env = os.environ.get("TANDEM_ASYNC_SCHEDULING")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return device.type == "cuda"


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = self.runner.tokenizer
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.kv = KVCacheManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.aging_s,
                                   prefill_chunk_while_decoding=config.prefill_chunk_while_decoding)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}        # finished with hold_kv, awaiting export/release
        self._stats = EngineStats(kv_blocks_total=self.runner.num_kv_blocks)
        self._pending: list[RequestOutput] = []
        self.async_scheduling = resolve_async_scheduling(config.async_scheduling, self.runner.device)
        self._inflight: StepInFlight | None = None
        self.num_steps_ahead = 0             # steps launched before the previous step's ids reached the host

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: str = "interactive", *, arrival_time: float | None = None,
                    hold_kv: bool = False, output_token_ids: list[int] | None = None,
                    kv_import: KVExport | None = None) -> None:
        """Queue a request. `output_token_ids` resumes a generation started elsewhere (its tokens count
        against max_tokens); `kv_import` supplies already computed KV for its first tokens."""
        params = params or SamplingParams()
        params.validate()
        if priority not in PRIORITIES:
            raise InvalidParams(f"priority must be one of {PRIORITIES}, got {priority!r}", "priority")
        if request_id in self.requests or request_id in self.held:
            raise InvalidParams(f"duplicate request id {request_id!r}", "request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids, params, len(output_token_ids or ()))
        req = Request(request_id, ids, params, priority, output_token_ids=list(output_token_ids or ()),
                      hold_kv=hold_kv)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.runner.init_request_state(req)
        if kv_import is not None:
            self._import_kv(req, kv_import)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def _check_prompt(self, ids: list[int], params: SamplingParams, n_out: int) -> None:
        if not ids:
            raise InvalidParams("prompt must contain at least one token", "prompt")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidParams(f"prompt token ids must be in [0, {vocab})", "prompt")
        check_request_fits(self.kv, len(ids), params.max_tokens, n_out, self.max_model_len)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            self.release_kv(request_id)
            return None
        self.scheduler.remove(req)
        if req.hold_kv:
            self.kv.free(req)
        req.finish_reason = "abort"
        self._drop_dead_inflight()          # its token in flight (if any) is dropped when the step is read
        return self._make_output(req, finished=True)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or self._inflight is not None

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        prev, self._inflight = self._inflight, None
        launched = None
        if prev is not None:
            ahead = self._ahead_batch(prev) if self.async_scheduling else None
            if ahead is not None:
                launched = self._launch_ahead(prev, *ahead)
            outs, stopped = self._read(prev, launched)
            outputs += outs
            if launched is not None and stopped == len(launched.reqs):
                launched = None               # all stopped at `prev`: nothing to wait for
        else:
            ahead = None
        if ahead is None:
            batch = self.scheduler.schedule()
            if not batch:
                return outputs
            launched = self._launch(batch)
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                outputs += self._read(launched, None)[0]
        self._stats.steps += 1
        self._stats.last_step_s = time.perf_counter() - t0
        return outputs

    def _launch(self, batch) -> StepInFlight | None:
        """Run a scheduled batch's forward and queue its sampling (no host sync)."""
        now = time.monotonic()
        for req in batch.reqs:
            if req.first_scheduled_at is None:
                req.first_scheduled_at = now
        sample_reqs, logits = self.runner.execute(batch)
        for req, n in zip(batch.reqs, batch.num_new_tokens):
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req)
            self._stats.prompt_tokens_computed += n if n > 1 else 0
        if not sample_reqs:
            return None
        return self._sample(sample_reqs, [self._sample_row(r) for r in sample_reqs], logits)

    def _sample(self, reqs: list[Request], rows: list[SampleRow], logits: torch.Tensor) -> StepInFlight:
        """Queue sampling and the copies of its results to the host."""
        ids, raw_lp = sample_ids(logits, rows)
        hc = self.runner.host_ids
        lp = hc.start_any(logprob_tensor(raw_lp, rows, ids)) if raw_lp is not None else None
        return StepInFlight(reqs, ids, hc.start(ids), rows, lp)

    def _ahead_batch(self, prev: StepInFlight) -> tuple[list[Request], list[int]] | None:
        """The decode batch that may run before `prev`'s ids are read: its requests and their rows in
        `prev`, or None when this step must go through the scheduler (see the module docstring). It is
        the batch the scheduler would pick: all running requests, minus those `prev` ends by length."""
        sched = self.scheduler
        if not sched.running:
            return None
        reqs, rows, need, alive = [], [], 0, 0
        max_len, bs = self.max_model_len, self.kv.block_size
        for i, r in enumerate(prev.reqs):
            if not self._alive(r):
                continue                      # aborted since `prev` was launched
            alive += 1
            p = r.params
            if r.hold_kv:
                return None
            n = len(r.all_token_ids)
            if len(r.output_token_ids) + 1 >= p.max_tokens or n + 1 >= max_len:
                continue                      # `prev` gives its last token
            need += (n + bs) // bs - len(r.block_table)          # blocks for n + 1 tokens
            reqs.append(r)
            rows.append(i)
        # `prev`'s live requests are running; if they are not all the running ones, a prefill chunk (or a
        # request of an older step) is running too: that goes through the scheduler
        if alive != len(sched.running):
            return None
        if not reqs or len(reqs) > sched.max_num_batched_tokens or need > self.kv.pool.num_free:
            return None
        if sched.waiting and not self._batch_full_before_waiting(reqs):
            return None
        return reqs, rows

    def _batch_full_before_waiting(self, reqs: list[Request]) -> bool:
        """With requests waiting, the scheduler would still pick just `reqs` when they fill max_num_seqs
        and every waiting request is ordered after all of them (a saturated worker's queue): it stops
        at max_num_seqs before it reaches the queue. (If one of `reqs` then turns out to have stopped
        at the step being read, the freed slot is filled one step later than synchronous stepping.)"""
        sched = self.scheduler
        if len(reqs) < sched.max_num_seqs:
            return False
        key = sched.order_key(sched.clock())
        last = max(key(r) for r in reqs)
        return all(key(w) > last for w in sched.waiting)

    def _launch_ahead(self, prev: StepInFlight, reqs: list[Request], rows: list[int]) -> StepInFlight:
        for r in reqs:
            self.kv.allocate_slots(r, 1)      # cannot fail: checked in _ahead_batch
        ids_in = prev.ids[:len(reqs)] if rows[-1] == len(rows) - 1 else \
            prev.ids.index_select(0, to_device(rows, torch.long, prev.ids.device))
        logits = self.runner.execute_ahead(reqs, ids_in)
        self.num_steps_ahead += 1
        return self._sample(reqs, [self._sample_row(r, ahead=1) for r in reqs], logits)

    def _alive(self, req: Request) -> bool:
        return req.status == Status.RUNNING and self.requests.get(req.request_id) is req

    def _read(self, st: StepInFlight, nxt: StepInFlight | None) -> tuple[list[RequestOutput], int]:
        """Wait for a launched step's ids and do its host work. Rows of requests that ended meanwhile
        (aborted, or stopped at the step before when this one ran ahead) are dropped. Requests also in
        `nxt` (launched ahead, computing the token read here) count that token as computed. Returns
        the outputs and how many requests of `nxt` finished here."""
        toks = self.runner.host_ids.get(st.host)
        lps = logprob_dicts(self.runner.host_ids.get(st.logprobs), st.rows, toks) if st.logprobs else None
        ahead = {id(r) for r in nxt.reqs} if nxt is not None else ()
        outputs = []
        stopped = 0
        for i, (req, tok) in enumerate(zip(st.reqs, toks)):
            if not self._alive(req):
                continue
            finished = self._on_token(req, tok, lps[i] if lps else None)
            if id(req) in ahead:
                if finished:
                    stopped += 1
                else:
                    req.num_computed_tokens += 1
                    self.kv.cache_full_blocks(req)
            outputs.append(self._make_output(req, finished))
        return outputs, stopped

    def _drain(self) -> None:
        """Finish the step in flight now; its outputs wait in `_pending` for the next `step()`."""
        st, self._inflight = self._inflight, None
        if st is not None:
            self._pending += self._read(st, None)[0]

    def _unsend(self, req: Request) -> None:
        """Take a request's unfinished deltas back out of `_pending` (detach returns them in its own)."""
        mine = [o for o in self._pending if o.request_id == req.request_id and not o.finished]
        if not mine:
            return
        self._pending = [o for o in self._pending if not (o.request_id == req.request_id and not o.finished)]
        lps = []
        for o in mine:
            req.sent_tokens -= len(o.new_token_ids)
            req.sent_text_len -= len(o.new_text)
            lps += o.logprobs or []
        req.pending_logprobs = lps + req.pending_logprobs

    def _drop_dead_inflight(self) -> None:
        st = self._inflight
        if st is not None and not any(self._alive(r) for r in st.reqs):
            self._inflight = None

    def _sample_row(self, req: Request, ahead: int = 0) -> SampleRow:
        """`ahead`: tokens the request has produced that the host has not seen yet."""
        p = req.params
        if len(req.output_token_ids) + ahead < p.min_tokens:
            banned = list(self.tokenizer.eos_token_ids) + list(p.stop_token_ids)
            return SampleRow(p.temperature, p.top_k, p.top_p, req.generator, banned, p.logprobs)
        row = req.sample_row
        if row is None:
            row = req.sample_row = SampleRow(p.temperature, p.top_k, p.top_p, req.generator, [], p.logprobs)
        return row

    def _on_token(self, req: Request, tok: int, lp: dict | None) -> bool:
        """Append a sampled token, apply the stop rules; True when the request finished."""
        req.append_token(tok)
        self._stats.generated_tokens += 1
        if lp is not None:
            req.pending_logprobs.append(lp)
        req.text += req.detok.push(tok)
        p = req.params
        n_out = req.num_output_tokens
        stopped_by_string = False
        if n_out >= p.min_tokens:
            if (not p.ignore_eos and tok in self.tokenizer.eos_token_ids) or tok in p.stop_token_ids:
                req.finish_reason = "stop"
            elif p.stop:
                stopped_by_string = self._check_stop_strings(req)
        if req.finish_reason is None and (n_out >= p.max_tokens or req.num_tokens >= self.max_model_len):
            req.finish_reason = "length"
        if req.finish_reason is not None:
            if not stopped_by_string and not req.hold_kv:
                req.text += req.detok.flush()            # an incomplete UTF-8 tail (continued elsewhere if held)
            self._finish(req)
            return True
        return False

    def _check_stop_strings(self, req: Request) -> bool:
        longest = max(len(s) for s in req.params.stop)
        start = max(0, req.sent_text_len - longest)
        hits = [i for i in (req.text.find(s, start) for s in req.params.stop) if i >= 0]
        if hits:
            req.text = req.text[:min(hits)]
            req.finish_reason = "stop"
        return bool(hits)

    def _finish(self, req: Request) -> None:
        self.scheduler.remove(req)
        del self.requests[req.request_id]
        if req.hold_kv:
            req.held_at = time.monotonic()
            self.held[req.request_id] = req

    def detach_request(self, request_id: str) -> RequestOutput | None:
        """Stop generating a live request but keep its computed KV held for export, so another worker
        can continue it (role flip decode→prefill). Returns a last, unfinished delta with any tokens
        and text not yet emitted; the caller re-dispatches the request with `output_token_ids`.
        A step in flight is read first (its token for this request goes into that delta); None if
        the request is unknown or finished in that step (its final output then comes from `step()`)."""
        self._drain()
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._unsend(req)
        self.scheduler.waiting.remove(req) if req in self.scheduler.waiting else self.scheduler.running.remove(req)
        req.status = Status.FINISHED
        req.held_at = time.monotonic()
        self.held[request_id] = req
        return self._make_output(req, finished=False, hold_text=False)

    def release_stale_held(self, ttl_s: float) -> list[str]:
        """Free held KV nobody fetched within `ttl_s` (its decode worker died or gave up)."""
        now = time.monotonic()
        stale = [rid for rid, r in self.held.items() if now - r.held_at > ttl_s]
        for rid in stale:
            self.release_kv(rid)
        return stale

    def _make_output(self, req: Request, finished: bool, hold_text: bool = True) -> RequestOutput:
        """The delta since the last one. While a request has stop strings, the last (longest stop - 1)
        characters are held back so a stop string is never streamed."""
        hold = 0 if finished or not hold_text or not req.params.stop else max(len(s) for s in req.params.stop) - 1
        end = max(req.sent_text_len, len(req.text) - hold)
        new_text = req.text[req.sent_text_len:end]
        req.sent_text_len = end
        new_ids = req.output_token_ids[req.sent_tokens:]
        t_sched = req.first_scheduled_at
        queue_s = (max(0.0, t_sched - req.arrival_time)
                   if req.sent_tokens == 0 and new_ids and t_sched is not None else None)
        req.sent_tokens = req.num_output_tokens
        lps, req.pending_logprobs = (req.pending_logprobs or None), []
        return RequestOutput(req.request_id, new_ids, new_text, finished, req.finish_reason if finished else None,
                             req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens, lps,
                             queue_s=queue_s)

    # ------------------------------------------------------------------ KV export / import
    def export_kv(self, request_id: str, start_block: int = 0) -> KVExport:
        """Copy out the computed KV of a held (finished, hold_kv) or running request."""
        req = self.held.get(request_id) or self.requests.get(request_id)
        if req is None:
            raise KeyError(request_id)
        n = req.num_computed_tokens
        nblk = self.kv.blocks_needed(n)
        data = self.runner.read_blocks(req.block_table[start_block:nblk])
        return KVExport(request_id, list(req.prompt_token_ids), list(req.output_token_ids), n,
                        self.kv.block_size, start_block, data)

    def release_kv(self, request_id: str) -> None:
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def _import_kv(self, req: Request, kv: KVExport) -> None:
        import_kv_blocks(self.kv, req, kv.num_tokens, kv.block_size, kv.start_block,
                         lambda new, src: self.runner.write_blocks(new, kv.data[:, :, src]))

    # ------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = {p: 0 for p in PRIORITIES}
        for r in self.scheduler.waiting:
            s.num_waiting[r.priority] += 1
        s.waiting_prefill_tokens = self.scheduler.waiting_prefill_tokens()
        s.kv_blocks_used = self.kv.pool.num_used
        s.kv_blocks_cached_free = self.kv.pool.num_cached_free
        s.num_preemptions = self.scheduler.num_preemptions
        return s

    def drain_kv_events(self) -> tuple[list[int], list[int]]:
        return self.kv.pool.drain_events()

    def prefix_hit_tokens(self, token_ids: list[int]) -> int:
        return self.kv.count_prefix_hit(token_ids)
