"""Engine: one worker's inference loop (add/step/abort), vLLM-v1-engine-core style, no HTTP.

`Engine.step()` runs one scheduler step: schedule → one flattened forward over all scheduled tokens
(chunked prefills and decodes together) → sample the sequences whose computed prefix reached their
end → detokenize, apply stop rules, emit deltas. Finished requests free their KV blocks unless
they were added with `hold_kv` (a prefill worker keeps them until the KV is exported).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tandem.common.errors import ContextTooLong, InvalidParams
from tandem.common.outputs import EngineStats, RequestOutput
from tandem.common.sampling import PRIORITIES, SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.request import Request, Status
from tandem.engine.runner import ModelRunner
from tandem.engine.sampler import SampleRow, sample
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


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = self.runner.tokenizer
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.kv = KVCacheManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.aging_s)
        self.requests: dict[str, Request] = {}
        self.held: dict[str, Request] = {}        # finished with hold_kv, awaiting export/release
        self._stats = EngineStats(kv_blocks_total=self.runner.num_kv_blocks)
        self._pending: list[RequestOutput] = []

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
        total = len(ids) + params.max_tokens
        if len(ids) + n_out >= self.max_model_len or total > self.max_model_len:
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(ids)} in the prompt, {params.max_tokens} for the completion).", "messages")
        if self.kv.blocks_needed(total) > self.kv.pool.num_blocks:
            raise ContextTooLong(f"request needs {total} tokens of KV cache but this worker holds only "
                                 f"{self.kv.pool.num_blocks * self.kv.block_size}", "max_tokens")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            self.release_kv(request_id)
            return None
        self.scheduler.remove(req)
        if req.hold_kv:
            self.kv.free(req)
        req.finish_reason = "abort"
        return self._make_output(req, finished=True)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        sample_reqs, logits = self.runner.execute(batch)
        for req, n in zip(batch.reqs, batch.num_new_tokens):
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req)
            self._stats.prompt_tokens_computed += n if n > 1 else 0
        if sample_reqs:
            rows = [self._sample_row(r) for r in sample_reqs]
            ids, lps = sample(logits, rows)
            for req, tok, lp in zip(sample_reqs, ids, lps):
                outputs.append(self._on_token(req, tok, lp))
        self._stats.steps += 1
        self._stats.last_step_s = time.perf_counter() - t0
        return outputs

    def _sample_row(self, req: Request) -> SampleRow:
        p = req.params
        banned: list[int] = []
        if req.num_output_tokens < p.min_tokens:
            banned = list(self.tokenizer.eos_token_ids) + list(p.stop_token_ids)
        return SampleRow(p.temperature, p.top_k, p.top_p, req.generator, banned, p.logprobs)

    def _on_token(self, req: Request, tok: int, lp: dict | None) -> RequestOutput:
        req.append_token(tok)
        self._stats.generated_tokens += 1
        if lp is not None:
            req.pending_logprobs.append(lp)
        req.text += req.detok.push([tok])
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
            return self._make_output(req, finished=True)
        return self._make_output(req, finished=False)

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
        and text not yet emitted; the caller re-dispatches the request with `output_token_ids`."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
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
        req.sent_tokens = req.num_output_tokens
        lps, req.pending_logprobs = (req.pending_logprobs or None), []
        return RequestOutput(req.request_id, new_ids, new_text, finished, req.finish_reason if finished else None,
                             req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens, lps)

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
        if kv.block_size != self.kv.block_size:
            raise InvalidParams("KV import with a different block size")
        n = min(kv.num_tokens, req.num_tokens - 1)         # leave >= 1 token to compute
        hit = self.kv.match_prefix(req)                      # blocks already held here need no copy
        hit_blocks = min(hit, n) // self.kv.block_size
        extra = req.block_table[hit_blocks:]
        if extra:
            self.kv.pool.release(list(reversed(extra)))
            del req.block_table[hit_blocks:]
        need_blocks = self.kv.blocks_needed(n)
        if hit_blocks < kv.start_block or need_blocks - hit_blocks > self.kv.pool.num_free:
            self.kv.free(req)                                # cannot use it: recompute instead
            return
        new = self.kv.pool.allocate(need_blocks - hit_blocks)
        src = slice(hit_blocks - kv.start_block, need_blocks - kv.start_block)
        self.runner.write_blocks(new, kv.data[:, :, src])
        req.block_table.extend(new)
        req.num_computed_tokens = n
        req.num_cached_tokens = min(n, req.num_prompt_tokens)
        self.kv.cache_full_blocks(req)

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
