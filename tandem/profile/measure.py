"""GPU measurements behind `tandem profile` and `benchmarks/engine.py` (imports torch).

All engine timings go through the real `Engine` (scheduler, CUDA-graph decode, sampler, detokenizer),
so they are what a worker actually sees per step. Decode points are set up without paying for a
prefill: each request is added with a random-KV `KVExport` of its context, so its first step already
is a decode step (KV contents do not change the cost of attention).
"""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager

import torch

from tandem.common.sampling import SamplingParams


# --------------------------------------------------------------------------- ceilings
def _is_sync_warning(msg: str) -> bool:
    """A sync reported by torch.cuda sync debug mode; not torch's own notice that the mode is a
    prototype ("Synchronization debug mode is a prototype feature ..."), which is no sync."""
    m = msg.lower()
    return "synchroniz" in m and "debug mode" not in m


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn, iters: int = 10, warmup: int = 3, graph: bool = False) -> float:
    """Median seconds of fn() timed with CUDA events. graph=True captures fn in a CUDA graph and
    times its replays: for short kernels, whose Python launch cost would otherwise be timed too."""
    for _ in range(warmup):
        fn()
    _sync()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
        _sync()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + bytes written per second (GB/s), random data."""
    n = nbytes // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), iters=20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / t / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = time_cuda(lambda: a @ b, iters=10)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / t / 1e12


# --------------------------------------------------------------------------- model arithmetic
def kv_bytes_per_token(mc, dtype_bytes: int = 2) -> int:
    return mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * dtype_bytes


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step must read: every parameter once, except an untied input
    embedding (only B rows of it are gathered)."""
    seen, total = set(), 0
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is emb and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


def linear_params_per_token(mc) -> int:
    """Matmul parameters every token goes through (all layers' projections; lm_head excluded)."""
    h, q, kv, i = mc.hidden_size, mc.q_size, mc.kv_size, mc.intermediate_size
    return mc.num_hidden_layers * (h * (q + 2 * kv) + q * h + h * 2 * i + i * h)


def prefill_flops(mc, new_tokens: int, cached: int = 0, sampled_rows: int = 1) -> float:
    """FLOPs of a prefill of `new_tokens` on top of `cached` tokens: projections + causal attention
    (QK^T and PV, only the visible half) + lm_head for the sampled rows."""
    n = new_tokens
    lin = 2.0 * n * linear_params_per_token(mc)
    visible = n * cached + n * (n + 1) / 2
    attn = 4.0 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * visible
    head = 2.0 * sampled_rows * mc.hidden_size * mc.vocab_size
    return lin + attn + head


# --------------------------------------------------------------------------- engine probes
class EngineProbe:
    """Drives an `Engine` through prefill / decode / mixed steps and times them."""

    def __init__(self, engine, seed: int = 0):
        self.engine = engine
        self.runner = engine.runner
        self.mc = engine.model_config
        self.block_size = engine.config.block_size
        self.g = torch.Generator().manual_seed(seed)
        self._n = 0
        self._kv_data: dict[int, torch.Tensor] = {}

    # -- helpers
    def rid(self, tag: str) -> str:
        self._n += 1
        return f"probe-{tag}-{self._n}"

    def random_ids(self, n: int) -> list[int]:
        hi = min(self.mc.vocab_size, 100000)
        return torch.randint(1000, hi, (n,), generator=self.g).tolist()

    def _kv_export(self, rid: str, ids: list[int]):
        from tandem.engine.engine import KVExport
        n = len(ids)
        nblk = -(-n // self.block_size)
        data = self._kv_data.get(nblk)
        if data is None:
            kv = self.runner.kv_cache
            shape = (kv.shape[0], 2, nblk) + tuple(kv.shape[3:])
            for k in list(self._kv_data):                  # keep one random block set at a time
                del self._kv_data[k]
            data = self._kv_data[nblk] = torch.randn(shape, dtype=kv.dtype, device=kv.device)
        return KVExport(rid, list(ids), [], n, self.block_size, 0, data)

    def clear(self) -> None:
        eng = self.engine
        for rid in list(eng.requests):
            eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step()

    def kv_capacity_tokens(self) -> int:
        return self.engine.kv.pool.num_blocks * self.block_size

    def fits(self, batch: int, ctx: int, extra: int = 64) -> bool:
        per = -(-(ctx + extra) // self.block_size)
        return batch * per <= self.engine.kv.pool.num_blocks

    # -- prefill
    def prefill_time(self, n_tokens: int, prefix: list[int] | None = None, repeats: int = 3) -> float:
        """Median seconds from submitting one prompt of (prefix +) n_tokens new tokens to its first
        token (prefix, if given, is made resident in the prefix cache first)."""
        eng = self.engine
        ts = []
        for _ in range(repeats + 1):
            if prefix:
                self._run_to_end([prefix])                  # cache the prefix
            ids = (prefix or []) + self.random_ids(n_tokens)
            _sync()
            t0 = time.perf_counter()
            rid = self.rid("pf")
            eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            while rid in eng.requests:
                eng.step()
            ts.append(time.perf_counter() - t0)
            self.clear()
        return statistics.median(ts[1:])

    def _run_to_end(self, prompts) -> None:
        for p in prompts:
            self.engine.add_request(self.rid("warm"), p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while self.engine.has_unfinished_requests():
            self.engine.step()

    # -- decode
    def start_decode(self, batch: int, ctx: int, max_tokens: int) -> list[str]:
        eng = self.engine
        rids = []
        for _ in range(batch):
            rid = self.rid("dec")
            ids = self.random_ids(ctx)
            eng.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            kv_import=self._kv_export(rid, ids))
            rids.append(rid)
        return rids

    def decode_step_time(self, batch: int, ctx: int, steps: int = 20, warmup: int = 3,
                         async_scheduling: bool | None = None) -> dict:
        """Engine wall time per decode step of `batch` sequences at context ~ctx, and the GPU time of
        the same step alone (graph replay), so engine overhead = step_s - gpu_s. `async_scheduling`
        (None: the engine's setting) picks synchronous steps or steps launched ahead; with steps
        ahead, a call's wall time is the pipelined time per step."""
        eng = self.engine
        saved = eng.async_scheduling
        if async_scheduling is not None:
            eng.async_scheduling = async_scheduling
        try:
            self.start_decode(batch, ctx, max_tokens=warmup + steps + 8)
            for _ in range(warmup):
                eng.step()
            _sync()
            per = []
            ahead0 = eng.num_steps_ahead
            t0 = time.perf_counter()
            for _ in range(steps):
                t = time.perf_counter()
                eng.step()
                per.append(time.perf_counter() - t)
            _sync()
            mean_s = (time.perf_counter() - t0) / steps
            ahead = eng.num_steps_ahead - ahead0
        finally:
            eng.async_scheduling = saved
        step_s = statistics.median(per)
        gpu_s = None
        gr = self.runner.graphs
        if gr is not None and batch <= gr.max_batch:
            g = gr.graphs[gr.bucket_for(batch)]
            gpu_s = time_cuda(g.replay, iters=10, warmup=2)
        self.clear()
        return {"batch": batch, "ctx": ctx, "mean_ctx": ctx + warmup + steps / 2, "step_s": step_s, "mean_step_s": mean_s,
                "min_step_s": min(per), "max_step_s": max(per), "gpu_s": gpu_s,
                "async_scheduling": eng.async_scheduling if async_scheduling is None else async_scheduling,
                "steps_ahead": ahead}

    def host_syncs_ahead(self, batch: int = 2, ctx: int = 256, steps: int = 8) -> dict:
        """Stream syncs (torch.cuda sync debug mode) during decode steps launched ahead: any sync there
        makes the host wait for the step it just queued, so the overlap is lost. Expect 0."""
        import warnings
        eng = self.engine
        saved = eng.async_scheduling
        eng.async_scheduling = True
        self.start_decode(batch, ctx, max_tokens=steps + 10)
        try:
            for _ in range(3):
                eng.step()
            ahead0 = eng.num_steps_ahead
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode(1)
                try:
                    for _ in range(steps):
                        eng.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [m for m in (str(w.message) for w in caught) if _is_sync_warning(m)]
            ahead = eng.num_steps_ahead - ahead0
        finally:
            eng.async_scheduling = saved
            self.clear()
        return {"steps": steps, "steps_ahead": ahead, "syncs": len(syncs), "first_sync": syncs[0][:300] if syncs else None}

    def decode_breakdown(self, batch: int, ctx: int, steps: int = 20, async_scheduling: bool = False) -> dict:
        """Where an engine decode step's wall time goes (mean seconds per step): scheduler, runner
        (input prep + graph launch; `execute_ahead` for steps launched ahead), sampler launch, wait
        (host blocked on the sampled ids: GPU time not hidden), the rest (detokenizer, stop checks,
        outputs, bookkeeping)."""
        import tandem.engine.engine as engine_mod
        eng = self.engine
        acc = {"schedule": 0.0, "execute": 0.0, "sample": 0.0, "wait": 0.0}

        def wrap(obj, name, key):
            orig = getattr(obj, name)

            def f(*a, **k):
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    acc[key] += time.perf_counter() - t
            setattr(obj, name, f)
            return orig

        saved = eng.async_scheduling
        eng.async_scheduling = async_scheduling
        self.start_decode(batch, ctx, max_tokens=steps + 12)
        for _ in range(3):
            eng.step()
        wrap(eng.scheduler, "schedule", "schedule")
        wrap(eng.runner, "execute", "execute")
        wrap(eng.runner, "execute_ahead", "execute")
        wrap(eng.runner.host_ids, "get", "wait")
        o3 = wrap(engine_mod, "sample_ids", "sample")
        try:
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            total = time.perf_counter() - t0
        finally:
            del eng.scheduler.schedule, eng.runner.execute, eng.runner.execute_ahead   # drop the wrappers
            del eng.runner.host_ids.get
            engine_mod.sample_ids = o3
            eng.async_scheduling = saved
        self.clear()
        out = {k: v / steps for k, v in acc.items()}
        out["total"] = total / steps
        out["other"] = out["total"] - sum(acc.values()) / steps
        return out

    # -- serving path
    def worker_overhead(self, batches=(1, 8, 32, 128), ctx: int = 1024, steps: int = 12,
                        prompt_tokens=(128, 1024, 4096), repeats: int = 3) -> dict:
        """Host time the worker process adds to the engine (`tandem.worker.proc.WorkerCore`, in process,
        no socket): per decode step, WorkerCore.step (engine step + deltas built and msgpack-encoded)
        minus Engine.step, interleaved at the same batch (medians); per request, a `Generate` message
        decoded and admitted (`WorkerCore.handle`: validation, request state, detokenizer). Needs
        pyzmq/msgpack (the worker's imports)."""
        from tandem.worker.proc import WorkerCore
        from tandem.worker.protocol import Generate, decode, encode
        eng = self.engine
        sent = [0]

        def send(msg):
            sent[0] += len(encode(msg))
        core = WorkerCore(eng, "probe", send=send)
        rows = []
        for b in batches:
            if not self.fits(b, ctx, extra=2 * steps + 16):
                continue
            self.start_decode(b, ctx, max_tokens=2 * steps + 8)
            for _ in range(3):
                core.step()
            te, tw = [], []
            for _ in range(steps):
                t = time.perf_counter()
                eng.step()
                te.append(time.perf_counter() - t)
                t = time.perf_counter()
                core.step()
                tw.append(time.perf_counter() - t)
            self.clear()
            rows.append((b, statistics.median(te), statistics.median(tw)))
        adm = []
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True).to_dict()
        for n in prompt_tokens:
            if n + 32 > self.engine.max_model_len:
                continue
            ts = []
            for _ in range(repeats):
                rid = self.rid("adm")
                buf = encode(Generate(rid, self.random_ids(n), sp))
                t = time.perf_counter()
                core.handle(decode(buf))
                ts.append(time.perf_counter() - t)
                eng.abort_request(rid)
            self.clear()
            adm.append((n, statistics.median(ts)))
        return {"decode_ctx": ctx, "batch": [r[0] for r in rows], "engine_step_s": [r[1] for r in rows],
                "worker_step_s": [r[2] for r in rows], "admission_tokens": [a[0] for a in adm],
                "admission_s": [a[1] for a in adm]}

    # -- mixed
    def mixed_step_time(self, prefill_tokens: int, decode_batch: int, decode_ctx: int, repeats: int = 3) -> float:
        """Wall time of one step holding a fresh prefill of `prefill_tokens` and `decode_batch` decodes."""
        eng = self.engine
        self.start_decode(decode_batch, decode_ctx, max_tokens=4 * (repeats + 2) + 8)
        for _ in range(2):
            eng.step()
        ts = []
        for _ in range(repeats + 1):
            rid = self.rid("mix")
            eng.add_request(rid, self.random_ids(prefill_tokens),
                            SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            _sync()
            t0 = time.perf_counter()
            eng.step()
            _sync()
            ts.append(time.perf_counter() - t0)
            while rid in eng.requests:
                eng.step()
            eng.step()
        self.clear()
        return statistics.median(ts[1:])


@contextmanager
def timed_load():
    """Times tandem.engine.runner.load_model calls made inside the block: yields a list of seconds."""
    import tandem.engine.runner as runner_mod
    orig = runner_mod.load_model
    took: list[float] = []

    def f(*a, **k):
        t = time.perf_counter()
        r = orig(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        took.append(time.perf_counter() - t)
        return r
    runner_mod.load_model = f
    try:
        yield took
    finally:
        runner_mod.load_model = orig


def free_engine(obj) -> None:
    del obj
    gc.collect()
    torch.cuda.empty_cache()
