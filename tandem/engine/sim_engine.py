"""SimEngine: the engine interface with the model forward replaced by a time cost.

Same `Scheduler`, `KVCacheManager`/`BlockPool` (prefix cache, KV events), priority classes, aging,
preemption, chunked prefill, hold_kv / export / import and finish rules as `Engine` — those objects
are reused as they are; only the forward pass is replaced by a step duration from a perf profile
(`tandem.sim.profile.SimProfile`). Torch-free.

Differences from `Engine` (no model, no tokenizer):
* prompts may be given as a length (`prompt=1234`): token ids are synthetic and the prompt shares no
  block with any other, unless the request's chained block hashes are supplied (`block_hashes=`) so
  that prefix sharing follows the trace's `hash_ids` (no hashing is done at run time);
* every generated token is `SIM_TOKEN`, never EOS or a stop token: generation ends at `max_tokens`
  (or the model length), i.e. `ignore_eos` semantics, which is what benchmark traces ask for;
* text is empty, logprobs are None.

Two ways to drive it:

* `step()` — the `Engine` API a worker drives: one scheduler step, returns `RequestOutput`s; the
  engine's virtual clock `now` advances by the step time.
* the discrete-event API used by `tandem sim` (`start`, `on_event`, `sync`, `observe`): the engine
  says when its next event is (`t_next`) and the simulator calls back at that time.

**Fast-forward.** When no request is waiting, every running request is in decode (one token to
compute) and the batch fits, the next steps are fully determined: each schedules every running
request for one token, and requests leave only when they reach max_tokens. Instead of calling the
scheduler once per step, the engine then runs a *decode window*: step times are computed from the
profile (batch and context known in advance), KV blocks are allocated and published and requests
finish at exactly the steps where the per-step engine would do it, and per-request token state is
brought up to date lazily. The window ends when the KV pool would run short (the scheduler takes
over and may preempt), when the batch empties, or as soon as anything touches the engine
(`sync(now)`: the in-progress step is then handed back to the real scheduler, so a new arrival is
seen by exactly the step that would have seen it). Results equal per-step stepping (tests check it);
only which physical block ids a request gets may differ, which nothing observes.
"""
from __future__ import annotations

import bisect
import itertools
import zlib
from dataclasses import dataclass
from typing import Any, Sequence, cast

from tandem._compiled import mypyc_attr
from tandem.common.errors import InvalidParams
from tandem.common.outputs import EngineStats, RequestOutput
from tandem.common.sampling import PRIORITIES, SamplingParams
from tandem.engine.kv_cache import KVCacheManager, check_request_fits, import_kv_blocks
from tandem.engine.request import PRIORITY_RANK, Request, Status
from tandem.engine.scheduler import ScheduledBatch, Scheduler

SIM_TOKEN = 1                 # the token id every simulated step generates
_PROMPTS: dict[int, list[int]] = {}     # synthetic prompts by length (read-only, shared)

IDLE, STEP, WINDOW, BOUNDARY = 0, 1, 2, 3
_UNIQUE_PROMPTS = itertools.count()   # synthetic prompts given as a length share no blocks


@mypyc_attr(native_class=False)
class _SyntheticPrompt(list):
    """A prompt of `SIM_TOKEN`s only (marks prompts whose token list need not be copied)."""
    __slots__ = ()


class SimTokens:
    """`Request.all_token_ids` of a request whose tokens are all `SIM_TOKEN` (a synthetic prompt
    plus simulated outputs): only the count is kept. The base class copies the whole prompt per
    request (~8 bytes and ~5 ns a token, 12 KB for a 1.5k-token prompt), which at 1,000 simulated
    workers was both memory and CPU. Reads give `SIM_TOKEN`s, as the list would."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def append(self, tok: int) -> None:
        self.n += 1

    def extend(self, toks) -> None:
        self.n += len(toks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [SIM_TOKEN] * len(range(*i.indices(self.n)))
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return SIM_TOKEN

    def __iter__(self):
        return iter([SIM_TOKEN] * self.n)

    def __eq__(self, other) -> bool:
        return len(other) == self.n and all(t == SIM_TOKEN for t in other)


def synthetic_prompt(n: int) -> list[int]:
    p = _PROMPTS.get(n)
    if p is None:
        p = _SyntheticPrompt([SIM_TOKEN] * n)
        if len(_PROMPTS) < 65536:
            _PROMPTS[n] = p
    return p


class SimRequest(Request):
    """`Request` plus simulator bookkeeping. Its `__init__` sets every `Request` field itself, without
    the dataclass machinery (~3 us a request interpreted); `tests/sim/test_compiled.py` checks it
    against the base class field by field. A synthetic prompt's `all_token_ids` is a `SimTokens`
    count instead of a copy."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 priority: str = "interactive", arrival_time: float = 0.0,
                 output_token_ids: list[int] | None = None, hold_kv: bool = False) -> None:
        rank = PRIORITY_RANK.get(priority)
        if rank is None:
            raise ValueError(priority)
        out: list[int] = output_token_ids if output_token_ids is not None else []
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.priority = priority
        self.arrival_time = arrival_time
        self.output_token_ids = out
        self.hold_kv = hold_kv
        self.status = Status.WAITING
        if type(prompt_token_ids) is _SyntheticPrompt and all(t == SIM_TOKEN for t in out):
            self.all_token_ids = SimTokens(len(prompt_token_ids) + len(out))  # type: ignore[assignment]
        else:
            self.all_token_ids = list(prompt_token_ids) + list(out)
        self.num_computed_tokens = 0
        self.block_table = []
        self.block_hashes = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.seq = 0
        self.finish_reason = None
        self.held_at = 0.0
        self.first_scheduled_at = None
        self.detok = None
        self.generator = None
        self.sample_row = None
        self.text = ""
        self.sent_text_len = 0
        self.pending_logprobs = []
        self.sent_tokens = 0
        self.rank = rank
        self._graph_bt = None
        self.token_times: Any = None                  # time of every token this engine generated
        self.owner: Any = None                        # the simulator's handle
        # decode-window state
        self.w_j0 = 0                                 # window step after which it joined
        self.w_nc0 = 0                                # num_computed_tokens when it joined
        self.w_m = 0                                  # window step its state is brought up to
        self.w_phase = 0                              # allocation phase (steps = phase mod block size)
        self.w_end = 0                                # window step at which it finishes
        self.w_a = 0                                  # window step its block table is brought up to


@dataclass
class SimKVExport:
    """The metadata of `Engine.export_kv` without the tensor: `num_tokens` computed tokens."""
    request_id: str
    prompt_token_ids: Any                 # a sequence of token ids (a tuple when only counted)
    output_token_ids: Any
    num_tokens: int
    block_size: int
    start_block: int = 0
    data: Any = None


@dataclass
class SimEngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None          # None: profile kv_capacity_tokens // block_size
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: the profile's
    prefill_chunk_while_decoding: int | None = None  # Scheduler's cap on prompt tokens next to decodes
    max_model_len: int | None = None          # None: the profile's, else 131072
    enable_prefix_caching: bool = True
    aging_s: float = 30.0
    step_overhead_s: float = 0.0              # host time added to every step (serving path)
    seq_overhead_s: float = 0.0               # host time per sequence in a step (outputs, messages)
    new_overhead_s: float = 0.0               # host time per request in its first step (admission)
    new_overhead_q: tuple | None = None       # or its measured quantiles (s), drawn per request id
    new_overhead_per: str = "request"         # "request": per request in its first step; "prefill_step":
                                              # once per step holding prefill work (ServingOverhead.new_per)
    fast_forward: bool = True
    model: str = "sim"


_INF = (float("inf"),)
_FINF = float("inf")
_REBASE_STEPS = 1024          # a window's step numbers are shifted down about this often


class _Window:
    """The decode set D (see `SimEngine._promote`). Steps are numbered from the window's creation;
    `ends[j-1]` is the end time of step j; a member that joined after step j0 with n computed tokens
    has n + (j - j0) computed after step j. A long-lived window is renumbered now and then
    (`SimEngine._rebase`) so that `ends` holds only the steps still needed, not one float per step
    since the window began (~GBs over a 30-minute 1,000-worker run)."""
    __slots__ = ("t0", "k", "ends", "planned", "fin", "buckets", "active", "b", "base", "cnt", "cmax",
                 "chunk", "alloc_done", "gen", "rebase_at", "ids")

    def __init__(self, t0: float, block_size: int):
        self.t0 = t0
        self.k = 0                      # steps applied
        self.planned = 0                # steps whose end time is known
        self.ends: list[float] = []
        self.fin: dict[int, list[SimRequest]] = {}  # step -> members finishing at it
        self.buckets: Any = None            # allocation phase -> members (eager block tables only)
        self.active: dict[SimRequest, None] = {}    # members (insertion ordered)
        self.b = 0                      # members
        self.base = 0                   # sum of (computed at join - join step)
        self.cnt = [0] * block_size     # members per allocation phase
        self.cmax: dict[int, SimRequest] = {}       # priority rank -> member with the latest (arrival, seq)
        self.chunk = 8
        self.alloc_done = 0
        self.ids: Any = None            # lazy block tables: blocks allocated to members, not handed out yet
        self.gen = 0
        self.rebase_at = _REBASE_STEPS


class SimEngine:
    def __init__(self, profile, config: SimEngineConfig | None = None, *, clock_start: float = 0.0):
        from tandem.sim.profile import SimProfile
        self.profile = SimProfile.coerce(profile)
        cfg = config or SimEngineConfig()
        if cfg.max_num_batched_tokens is None:
            cfg.max_num_batched_tokens = self.profile.max_num_batched_tokens
        if cfg.max_model_len is None:
            cfg.max_model_len = self.profile.max_model_len or 131072
        if cfg.num_kv_blocks is None:
            cfg.num_kv_blocks = self.profile.kv_blocks(cfg.block_size)
        self.config = cfg
        self.max_model_len = cfg.max_model_len
        self.block_size = cfg.block_size
        self.now = clock_start
        self.kv = KVCacheManager(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.aging_s,
                                   clock=self._clock, prefill_chunk_while_decoding=cfg.prefill_chunk_while_decoding)
        self.requests: dict[str, SimRequest] = {}
        self.held: dict[str, SimRequest] = {}
        self._stats = EngineStats(kv_blocks_total=cfg.num_kv_blocks)
        self._pending: list[RequestOutput] = []
        self._ovh = cfg.step_overhead_s
        self._ovh_seq = cfg.seq_overhead_s
        self._ovh_new = cfg.new_overhead_s
        self._ovh_new_q = tuple(cfg.new_overhead_q) if cfg.new_overhead_q else None
        if cfg.new_overhead_per not in ("request", "prefill_step"):
            raise ValueError(f"new_overhead_per must be 'request' or 'prefill_step', got {cfg.new_overhead_per!r}")
        self._ovh_per_step = cfg.new_overhead_per == "prefill_step"
        self._ff = cfg.fast_forward
        self._ff_limit = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        # Without prefix caching a block id is never read back (no hashes, no sharing): a decode
        # window then hands its members their blocks when they leave it (`_owe`), not every
        # block_size steps, from the blocks it allocated for them at the same steps as before.
        self._lazy_blocks = not cfg.enable_prefix_caching
        self.busy_s = 0.0                      # virtual seconds spent in steps
        self.num_windows = 0
        self.window_steps = 0
        self.on_finish: Any = None             # callback(req, now): a request finished
        self.on_first: Any = None              # callback(req, now): a request's first output token
        # discrete-event state
        self.state = IDLE
        self.t_next: float | None = None
        self._batch: ScheduledBatch | None = None
        self._dstep = False                    # the step in flight includes the decode set D
        self._step_start = 0.0
        self._step_dur = 0.0
        self._win: Any = None

    def _clock(self) -> float:
        return self.now

    def _new_cost(self, req: SimRequest, key: str | None = None) -> float:
        """Admission host time of `req` drawn from the measured quantiles: a function of the request
        id (and `key`) alone (deterministic, independent of step order and of fast-forward)."""
        q = self._ovh_new_q
        if q is None:
            return self._ovh_new
        h = (zlib.crc32((req.request_id if key is None else key).encode()) * 0x9E3779B1) & 0xFFFFFFFF
        x = h / 4294967296.0 * (len(q) - 1)
        i = int(x)
        return q[i] + (q[i + 1] - q[i]) * (x - i) if i + 1 < len(q) else q[-1]

    def _step_new_cost(self, req: SimRequest) -> float:
        """Mode "prefill_step": the admission host time of a step whose first prefill (chunk) is `req`'s,
        drawn by (request id, its chunk's start): eager prefill inputs and launches are built once per
        step, however many prompts or chunks it holds (real run 3: full 2048-token chunk steps took the
        same time with 0, 1 or 2 prompts admitted)."""
        return self._new_cost(req, f"{req.request_id}@{req.num_computed_tokens}")

    # ================================================================== requests (Engine API)
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    priority: str = "interactive", *, arrival_time: float | None = None,
                    hold_kv: bool = False, output_token_ids: Sequence[int] | None = None,
                    kv_import: SimKVExport | None = None, block_hashes: Sequence[int] | None = None,
                    token_times: Sequence[float] | None = None, owner=None) -> SimRequest:
        """Queue a request (as `Engine.add_request`). `prompt` is a list of token ids or a length.
        Discrete-event callers must `sync(now)` first and `kick(now)` after."""
        params = params or SamplingParams()
        if priority not in PRIORITY_RANK:
            raise InvalidParams(f"priority must be one of {PRIORITIES}, got {priority!r}", "priority")
        if request_id in self.requests or request_id in self.held:
            raise InvalidParams(f"duplicate request id {request_id!r}", "request_id")
        ids = synthetic_prompt(prompt) if isinstance(prompt, int) else list(prompt)
        n_out = len(output_token_ids) if output_token_ids else 0
        self._check_prompt(len(ids), params, n_out)
        req = SimRequest(request_id, ids, params, priority, self.now if arrival_time is None else arrival_time,
                         list(output_token_ids) if output_token_ids else None, hold_kv)
        if block_hashes is not None:
            req.block_hashes = block_hashes
        elif isinstance(prompt, int):
            base = (3 << 61) + (next(_UNIQUE_PROMPTS) << 24)
            req.block_hashes = list(range(base, base + (len(ids) + params.max_tokens) // self.block_size + 1))
        req.token_times = token_times
        req.owner = owner
        if output_token_ids:
            req.sent_tokens = n_out
        if kv_import is not None:
            self._import_kv(req, kv_import)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _check_prompt(self, n: int, params: SamplingParams, n_out: int) -> None:
        if n < 1:
            raise InvalidParams("prompt must contain at least one token", "prompt")
        check_request_fits(self.kv, n, params.max_tokens, n_out, self.max_model_len)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            self.release_kv(request_id)
            return None
        self._unlink(req)
        self.scheduler.remove(req)
        if req.hold_kv:
            self.kv.free(req)
        req.finish_reason = "abort"
        return self._make_output(req, finished=True)

    def _unlink(self, req: SimRequest) -> None:
        """Take a live request out of the decode set and out of the step in flight."""
        w = self._win
        if w is not None and req in w.active:
            if self.state == WINDOW:
                self.sync(self.now)
            self._materialize(req, w.k, w.ends)
            if w.ids is not None:
                self._owe(w, req)
            fl = w.fin.get(req.w_end)
            if fl is not None and req in fl:
                fl.remove(req)
            self._leave(w, req)
        if self._batch is not None and req in self._batch.reqs:
            i = self._batch.reqs.index(req)       # in the step in flight: it takes no part in it
            del self._batch.reqs[i]
            del self._batch.num_new_tokens[i]

    def detach_request(self, request_id: str) -> RequestOutput | None:
        """As `Engine.detach_request`: stop generating a live request but keep its computed KV held
        for export, so another worker can continue it (role flip decode -> prefill)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._unlink(req)
        sch = self.scheduler
        if req in sch.waiting:
            sch.waiting.remove(req)
        elif req in sch.running:
            sch.running.remove(req)
        req.status = Status.FINISHED
        req.held_at = self.now
        self.held[request_id] = req
        return self._make_output(req, finished=False)

    def release_stale_held(self, ttl_s: float) -> list[str]:
        """As `Engine.release_stale_held`, in virtual time."""
        stale = [rid for rid, r in self.held.items() if self.now - r.held_at > ttl_s]
        for rid in stale:
            self.release_kv(rid)
        return stale

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending) or self._win is not None

    @property
    def num_running(self) -> int:
        w = self._win
        return len(self.scheduler.running) + (w.b if w is not None else 0)

    # ================================================================== Engine.step (worker API)
    def step(self) -> list[RequestOutput]:
        """One scheduler step; the virtual clock advances by its duration."""
        outputs, self._pending = self._pending, []
        if self._win is not None:
            self._dissolve()
        dur = self._begin_step(self.now)
        if dur is None:
            return outputs
        self.now = self._step_start + dur
        self._end_step(self.now, outputs)
        self.state, self.t_next = IDLE, None
        return outputs

    def _make_output(self, req: SimRequest, finished: bool) -> RequestOutput:
        new_ids = req.output_token_ids[req.sent_tokens:]
        req.sent_tokens = len(req.output_token_ids)
        return RequestOutput(req.request_id, new_ids, "", finished, req.finish_reason if finished else None,
                             req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens, None)

    # ------------------------------------------------------------------ one real step
    def _begin_step(self, now: float) -> float | None:
        self.now = now
        batch = self.scheduler.schedule()
        if not batch:
            self._batch = None
            return None
        dur = self._batch_time(batch, now, 0, 0, 0)[0]
        self._batch = batch
        self._step_start = now
        self._step_dur = dur
        return dur

    def _batch_time(self, batch: ScheduledBatch, now: float, b: int, ctx: int, n_seqs: int) -> tuple[float, int, int]:
        """(duration, decodes, prefill tokens) of a step running `batch` besides b decodes of context sum
        ctx (n_seqs sequences) already counted: the profile's time plus the serving overheads. Marks
        the batch's first-scheduled requests (`first_scheduled_at`)."""
        pf = 0
        extra = extra_h = 0.0
        first_pf: SimRequest | None = None      # per-step admission cost: keyed by the first prefill
        prof = self.profile
        for r0, n in zip(batch.reqs, batch.num_new_tokens):
            req = cast(SimRequest, r0)
            if n == 1:
                b += 1
                ctx += req.num_computed_tokens + 1
            else:
                pf += n
                if req.num_computed_tokens:
                    extra += prof.ctx_extra(req.num_computed_tokens, n)
            if req.first_scheduled_at is None:
                req.first_scheduled_at = now
                if not self._ovh_per_step:
                    extra_h += self._new_cost(req)
                elif first_pf is None:
                    first_pf = req
            elif n > 1 and first_pf is None:
                first_pf = req
        if first_pf is not None and self._ovh_per_step:
            extra_h = self._step_new_cost(first_pf)
        dur = prof.step_time(b, ctx, pf, extra) + self._ovh + self._ovh_seq * (n_seqs + len(batch.reqs)) + extra_h
        return dur, b, pf

    def _end_step(self, now: float, outputs: list | None = None) -> None:
        """Tokens of the step in flight are out. Order as in `Engine.step`: every request's computed
        blocks are published, then tokens are appended (and requests finish) in batch order."""
        batch, self._batch = self._batch, None
        w = self._win if self._dstep else None
        self._dstep = False
        kv = self.kv
        caching = kv.pool.enable_prefix_caching
        st = self._stats
        if w is not None:
            j = w.k + 1
            if caching:
                self._d_cache(w, j)
        if batch is not None:
            for req, n in zip(batch.reqs, batch.num_new_tokens):
                req.num_computed_tokens += n
                if caching:
                    kv.cache_full_blocks(req)
                if n > 1:
                    st.prompt_tokens_computed += n
        if w is not None:
            self._d_finish(w, j)
            st.generated_tokens += w.gen
            w.gen = 0
            if not w.active:
                self._win = None
        if batch is not None:
            for r0 in batch.reqs:
                if r0.num_computed_tokens == len(r0.all_token_ids):
                    self._token(cast(SimRequest, r0), now, outputs)
        st.steps += 1
        st.last_step_s = self._step_dur
        self.busy_s += self._step_dur

    def _token(self, req: SimRequest, now: float, outputs: list | None) -> None:
        out = req.output_token_ids
        out.append(SIM_TOKEN)
        req.all_token_ids.append(SIM_TOKEN)
        self._stats.generated_tokens += 1
        if req.token_times is not None:
            req.token_times.append(now)
        if len(out) == 1 and self.on_first is not None:
            self.on_first(req, now)
        if len(req.output_token_ids) >= req.params.max_tokens or len(req.all_token_ids) >= self.max_model_len:
            req.finish_reason = "length"
            self._finish(req, now)
            if outputs is not None:
                outputs.append(self._make_output(req, True))
        elif outputs is not None:
            outputs.append(self._make_output(req, False))

    def _finish(self, req: SimRequest, now: float) -> None:
        self.scheduler.remove(req)
        del self.requests[req.request_id]
        if req.hold_kv:
            req.held_at = now
            self.held[req.request_id] = req
        if self.on_finish is not None:
            self.on_finish(req, now)

    # ================================================================== discrete-event API
    def start(self, now: float) -> None:
        """At a step boundary `now` with nothing in flight: begin the next step (or window, or idle)."""
        self.now = now
        sch = self.scheduler
        w = self._win
        if w is not None and w.k >= w.rebase_at and w.k == w.planned:
            self._rebase(w)
        if self._ff and sch.running:
            self._promote(now)
        w = self._win
        if w is not None:
            if not sch.waiting and not sch.running:
                if w.b and self._plan(w):
                    self.state, self.t_next = WINDOW, w.ends[-1]
                    return
                self._dissolve()
            elif self._mixed_begin(w, now):
                return
            else:
                self._dissolve()
        if not (sch.running or sch.waiting):
            self.state, self.t_next = IDLE, None
            return
        dur = self._begin_step(now)
        if dur is None:
            self.state, self.t_next = IDLE, None
        else:
            self.state, self.t_next = STEP, now + dur

    def kick(self, now: float) -> bool:
        """After adding work: start stepping if idle. Returns True when `t_next` changed."""
        if self.state == IDLE and (self.scheduler.waiting or self.scheduler.running or self._win is not None):
            self.start(now)
            return self.t_next is not None
        return False

    def on_event(self, now: float) -> None:
        """The event at `t_next` fires: complete the step / advance the window, then go on."""
        st = self.state
        if st == STEP:
            self._end_step(now)
            self.start(now)
        elif st == WINDOW:
            w = self._win
            self._process(w, w.planned)
            self.start(now)
        elif st == BOUNDARY:
            self.start(now)

    def observe(self, now: float) -> None:
        """Bring the engine's observable state (stats, KV events, finished requests) up to `now`:
        steps ended by then are applied, and the step in progress has its blocks allocated (the
        per-step engine allocates them when it schedules the step)."""
        if self.state != WINDOW:
            return
        w = self._win
        if w.k < w.planned and w.ends[w.k] <= now:
            self._process(w, bisect.bisect_right(w.ends, now, w.k, w.planned))
        if self.state == WINDOW and w.k < w.planned:
            self._d_alloc(w, w.k + 1)

    def sync(self, now: float) -> bool:
        """Before changing the engine's queues at `now`: a planned run of decode steps is cut at the
        step in progress (which completes as planned; the change is seen by the step after it, as
        in the per-step engine). Returns True when `t_next` changed."""
        if self.state != WINDOW:
            return False
        w = self._win
        self.observe(now)
        if w.k >= w.planned:                     # exactly at the last planned boundary
            self.state = BOUNDARY                # t_next unchanged: the pending event starts the next step
            return False
        j = w.k + 1                              # the step in progress at `now`
        self._d_alloc(w, j)
        old = self.t_next
        del w.ends[j:]
        w.planned = j
        self._batch = None
        self._dstep = True
        self._step_start = w.ends[j - 2] if j > 1 else w.t0
        self._step_dur = w.ends[j - 1] - self._step_start
        self.state, self.t_next = STEP, w.ends[j - 1]
        return self.t_next != old

    # ------------------------------------------------------------------ the decode set ("window")
    # Decode-ready running requests that come first in the scheduler's order are moved out of
    # scheduler.running into the window D. Invariant: every member of D orders before every request
    # the scheduler still sees (V = its waiting + running lists), there are at most
    # min(max_num_seqs, max_num_batched_tokens) of them, and their KV blocks for the step are
    # available. Then the real scheduler would schedule all of D first, one token each, and see V
    # with the budget and seats that D leaves — which is exactly `schedule()` on V with the limits
    # reduced by |D|. Steps with V empty are planned ahead without any scheduler call.

    def _promote(self, now: float) -> None:
        sch = self.scheduler
        running = sch.running
        cands: list[SimRequest] = [cast(SimRequest, r) for r in running
                                   if len(r.all_token_ids) - r.num_computed_tokens == 1 and r.output_token_ids]
        if not cands:
            return
        w = self._win
        room = self._ff_limit - (w.b if w is not None else 0)
        if room <= 0:
            return
        key = sch.order_key(now)
        if len(cands) == len(running) and not sch.waiting:
            minv = None
        else:
            cs = set(map(id, cands))
            rest = [key(r) for r in running if id(r) not in cs]
            rest.extend(map(key, sch.waiting))
            minv = min(rest)
        if w is not None and minv is not None and not self._maxkey(w, now) < minv:
            return                                  # the window itself is out of order: no growth
        if len(cands) > 1:
            cands.sort(key=key)
        if minv is None:
            moved: list[SimRequest] = cands[:room]
        else:
            moved = []
            for r in cands:
                if len(moved) >= room or not key(r) < minv:
                    break
                moved.append(r)
        if not moved:
            return
        if w is None:
            w = self._win = _Window(now, self.block_size)
            if self._lazy_blocks:
                w.ids = []
            else:
                w.buckets = [dict() for _ in range(self.block_size)]
            self.num_windows += 1
        if len(moved) == len(running):
            running.clear()
        else:
            ms = set(map(id, moved))
            running[:] = [r for r in running if id(r) not in ms]
        bs = self.block_size
        mt = self.max_model_len
        k = w.k
        cnt, buckets, fin, cmax = w.cnt, w.buckets, w.fin, w.cmax
        for r in moved:
            nc = r.num_computed_tokens
            r.w_j0 = r.w_m = r.w_a = k
            r.w_nc0 = nc
            ph = (k + 1 - nc) % bs
            r.w_phase = ph
            if buckets is not None:
                buckets[ph][r] = None
            cnt[ph] += 1
            w.base += nc - k
            steps = min(r.params.max_tokens - len(r.output_token_ids), mt - nc - 1)
            end = k + (steps if steps > 0 else 1)
            r.w_end = end
            lst = fin.get(end)
            if lst is None:
                fin[end] = [r]
            else:
                lst.append(r)
            w.active[r] = None
            c = cmax.get(r.rank)
            if c is None or (c.arrival_time, c.seq) < (r.arrival_time, r.seq):
                cmax[r.rank] = r
        w.b += len(moved)

    def _maxkey(self, w: "_Window", now: float):
        """Largest scheduler key in D: per priority class the latest arrival holds it."""
        cm = w.cmax
        key = self.scheduler.order_key(now)
        if len(cm) == 1:
            for r in cm.values():
                return key(r)
        return max(map(key, cm.values()))

    def _leave(self, w: "_Window", r: SimRequest) -> None:
        """Bookkeeping of a request leaving D (finish or abort)."""
        if w.buckets is not None:
            del w.buckets[r.w_phase][r]
        del w.active[r]
        w.cnt[r.w_phase] -= 1
        w.base -= r.w_nc0 - r.w_j0
        w.b -= 1
        rank = r.rank
        if w.cmax.get(rank) is r:
            best: Any = None
            for x in w.active:
                if x.rank == rank and (best is None or (best.arrival_time, best.seq) < (x.arrival_time, x.seq)):
                    best = x
            if best is None:
                del w.cmax[rank]
            else:
                w.cmax[rank] = best

    def _dissolve(self) -> None:
        """Hand D back to the scheduler (at a step boundary)."""
        w = self._win
        self._win = None
        if w is None:
            return
        k = w.k
        running = self.scheduler.running
        lazy = w.ids is not None
        for r in w.active:
            self._materialize(r, k, w.ends)
            if lazy:
                self._owe(w, r)
            running.append(r)
        if lazy and w.ids:
            raise AssertionError(f"decode window left {len(w.ids)} KV blocks unassigned")

    def _mixed_begin(self, w: "_Window", now: float) -> bool:
        """A step of D plus whatever the scheduler picks from V (module docstring)."""
        sch = self.scheduler
        nd = w.b
        j = w.k + 1
        if nd:
            key = sch.order_key(now)
            minv = min(min(map(key, sch.waiting)) if sch.waiting else _INF,
                       min(map(key, sch.running)) if sch.running else _INF)
            if not self._maxkey(w, now) < minv:
                return False
            if w.cnt[j % self.block_size] > self.kv.pool.num_free:
                return False
            self._d_alloc(w, j)
        S, B = sch.max_num_seqs, sch.max_num_batched_tokens
        sch.max_num_seqs, sch.max_num_batched_tokens = S - nd, B - nd
        try:
            batch = sch.schedule(nd)
        finally:
            sch.max_num_seqs, sch.max_num_batched_tokens = S, B
        dur, b, pf = self._batch_time(batch, now, nd, w.base + j * nd, nd)
        if b == 0 and pf == 0:
            if nd == 0:
                self._win = None
            return False
        self._batch = batch if batch else None
        self._dstep = nd > 0
        self._step_start = now
        self._step_dur = dur
        if nd:
            w.ends.append(now + dur)
            w.planned = j
        self.state, self.t_next = STEP, now + dur
        return True

    def _plan(self, w: "_Window") -> bool:
        """Plan the next steps of D alone (V empty): their end times, up to `w.chunk` steps, the next
        finish, or the step whose KV blocks would not be available. False if none fits."""
        bs = self.block_size
        ovh = self._ovh + self._ovh_seq * w.b       # b is fixed while D runs alone
        ends = w.ends
        fin = w.fin
        j = w.k
        t = ends[j - 1] if j else w.t0
        b, base, free = w.b, w.base, self.kv.pool.num_free
        cnt = w.cnt
        limit = j + w.chunk
        row = self.profile.decode_row(b)
        # row(x) inlined (the same arithmetic as Curve.__call__): segment i covers [lo, hi)
        xs, ys, sl, last = row.xs, row.ys, row.slopes, row.n - 2
        lo = hi = 0.0
        y0 = s0 = x0 = 0.0
        # a member needs at most chunk // bs + 1 blocks in `chunk` steps: when that many fit for
        # every member, no step can run short and the per-step check is skipped
        check = free < (w.chunk // bs + 1) * b
        while j < limit:
            jn = j + 1
            if check:
                need = cnt[jn % bs]
                if need > free:
                    break
                free -= need
            x = (base + jn * b) / b
            if not lo <= x < hi:
                i = bisect.bisect_right(xs, x) - 1
                i = 0 if i < 0 else (last if i > last else i)
                x0, y0, s0 = xs[i], ys[i], sl[i]
                lo = -_FINF if i == 0 else x0
                hi = _FINF if i == last else xs[i + 1]
            v = y0 + s0 * (x - x0)
            t += (v if v > 0.0 else 0.0) + ovh
            ends.append(t)
            j = jn
            if j in fin:
                break                             # a finish: hand control back (on time)
        w.planned = j
        if w.chunk < 1024:
            w.chunk *= 2
        return j > w.k

    def _rebase(self, w: "_Window") -> None:
        """At a step boundary (k == planned): renumber the window's steps from step S (a multiple of
        the block size, so allocation phases stay) and drop the end times before it. Only relative
        step numbers matter, except that members keeping token times still need `ends` from their
        last materialised step (w_m) on."""
        bs = self.block_size
        S = w.k - 1
        for r in w.active:
            if r.token_times is not None and r.w_m < S:
                S = r.w_m
        S -= S % bs
        w.rebase_at = w.k + _REBASE_STEPS
        if S < _REBASE_STEPS // 2:
            return
        for r in w.active:
            r.w_j0 -= S
            r.w_m -= S
            r.w_a -= S
            r.w_end -= S
        w.fin = {j - S: v for j, v in w.fin.items()}
        w.base += S * w.b
        w.t0 = w.ends[S - 1]
        del w.ends[:S]
        w.k -= S
        w.planned -= S
        w.alloc_done -= S
        w.rebase_at -= S

    def _materialize(self, r: SimRequest, j: int, ends: list[float]) -> None:
        d = j - r.w_m
        if d > 0:
            r.num_computed_tokens += d
            toks = [SIM_TOKEN] * d
            r.output_token_ids.extend(toks)
            r.all_token_ids.extend(toks)
            if r.token_times is not None:
                r.token_times.extend(ends[r.w_m:j])
            r.w_m = j

    def _owe(self, w: "_Window", r: SimRequest) -> None:
        """Lazy block tables: hand r the blocks the window allocated for it at steps w_a+1 ..
        alloc_done (one at each step of its allocation phase)."""
        a, b = r.w_a, w.alloc_done
        if b > a:
            bs, ph = self.block_size, r.w_phase
            n = (b - ph) // bs - (a - ph) // bs
            if n:
                ids = w.ids
                r.block_table += ids[-n:]
                del ids[-n:]
            r.w_a = b

    def _d_alloc(self, w: "_Window", j: int) -> None:
        if w.alloc_done >= j:
            return
        if w.ids is not None:
            n = w.cnt[j % self.block_size]
            if n:
                w.ids += self.kv.pool.allocate(n)
            w.alloc_done = j
            return
        bk = w.buckets[j % self.block_size]
        if bk:
            for r, blk in zip(bk, self.kv.pool.allocate(len(bk))):
                r.block_table.append(blk)
        w.alloc_done = j

    def _d_cache(self, w: "_Window", j: int) -> None:
        cb = w.buckets[(j + 1) % self.block_size]
        if cb:
            ends, kv = w.ends, self.kv
            for r in cb:
                self._materialize(r, j, ends)
                kv.cache_full_blocks(r)

    def _d_finish(self, w: "_Window", j: int) -> None:
        """Tokens of step j are out: requests reaching their end finish (in scheduler order)."""
        w.gen += w.b
        fl = w.fin.pop(j, None)
        w.k = j
        if fl is None:
            return
        t_j = w.ends[j - 1]
        if len(fl) > 1:
            t_s = w.ends[j - 2] if j > 1 else w.t0
            fl.sort(key=self.scheduler.order_key(t_s))
        ends = w.ends
        self.now = t_j
        lazy = w.ids is not None
        for r in fl:
            self._materialize(r, j, ends)
            if lazy:
                self._owe(w, r)
            self._leave(w, r)
            r.finish_reason = "length"
            self._finish(r, t_j)

    def _process(self, w: "_Window", upto: int) -> None:
        """Apply planned steps w.k+1 .. upto of D alone. A planned chunk has finishes only at its
        last step (planning stops there), so all its block allocations come first, in step order,
        exactly as step-by-step allocation would take them from the free list."""
        j = w.k
        if upto <= j:
            return
        bs = self.block_size
        buckets = w.buckets
        first = max(j, w.alloc_done) + 1
        if first <= upto and w.ids is not None:
            cnt = w.cnt                            # blocks of steps first..upto: b per full cycle
            L = upto - first + 1
            q = L // bs
            need = q * w.b
            for jj in range(first + q * bs, upto + 1):
                need += cnt[jj % bs]
            if need:
                w.ids += self.kv.pool.allocate(need)
            w.alloc_done = upto
        elif first <= upto:
            rs: list[SimRequest] = []
            for jj in range(first, upto + 1):
                bk = buckets[jj % bs]
                if bk:
                    rs.extend(bk)
            if rs:
                for r, blk in zip(rs, self.kv.pool.allocate(len(rs))):
                    r.block_table.append(blk)
            w.alloc_done = upto
        ends = w.ends
        t_prev = ends[j - 1] if j else w.t0
        n = upto - j
        if self.kv.pool.enable_prefix_caching:
            while j < upto:
                j += 1
                self._d_cache(w, j)
                self._d_finish(w, j)
        else:                                     # no finishes before the chunk's last step
            w.gen += w.b * (upto - 1 - j)
            self._d_finish(w, upto)
            j = upto
        st = self._stats
        t_last = ends[j - 1]
        st.steps += n
        st.generated_tokens += w.gen
        w.gen = 0
        st.last_step_s = t_last - (ends[j - 2] if j > 1 else w.t0)
        self.busy_s += t_last - t_prev
        self.window_steps += n
        self.now = t_last
        if not w.active:
            self._win = None

    # ================================================================== KV export / import
    def export_kv(self, request_id: str, start_block: int = 0) -> SimKVExport:
        req = self.held.get(request_id) or self.requests.get(request_id)
        if req is None:
            raise KeyError(request_id)
        return SimKVExport(request_id, req.prompt_token_ids, list(req.output_token_ids),
                           req.num_computed_tokens, self.kv.block_size, start_block)

    def release_kv(self, request_id: str) -> None:
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def _import_kv(self, req: SimRequest, kv: SimKVExport) -> None:
        """`Engine._import_kv` without the copy (`import_kv_blocks` with no data to write)."""
        import_kv_blocks(self.kv, req, kv.num_tokens, kv.block_size, kv.start_block)

    # ================================================================== introspection
    def stats(self) -> EngineStats:
        s = self._stats
        sch = self.scheduler
        s.num_running = self.num_running
        s.num_waiting = {p: 0 for p in PRIORITIES}
        for r in sch.waiting:
            s.num_waiting[r.priority] += 1
        s.waiting_prefill_tokens = sch.waiting_prefill_tokens()
        s.kv_blocks_used = self.kv.pool.num_used
        s.kv_blocks_cached_free = self.kv.pool.num_cached_free
        s.num_preemptions = sch.num_preemptions
        return s

    def drain_kv_events(self) -> tuple[list[int], list[int]]:
        return self.kv.pool.drain_events()

    def prefix_hit_tokens(self, token_ids: Sequence[int]) -> int:
        return self.kv.count_prefix_hit(token_ids)

    def prefix_hit_blocks(self, hashes: Sequence[int]) -> int:
        return len(self.kv.pool.lookup(hashes))
