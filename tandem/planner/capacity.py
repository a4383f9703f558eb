"""Capacity math from a measured perf profile. Pure functions, torch-free, NaN-free.

The perf profile (written by `tandem profile`) has this JSON shape::

    {"model", "device", "dtype", "block_size", "kv_capacity_tokens", "max_num_batched_tokens",
     "prefill": {"tokens": [...], "time_s": [...]},
     "prefill_ctx": {"cached_tokens": [...], "new_tokens": int, "time_s": [...]},
     "decode": {"batch": [...], "context": [...], "time_s": [[per context] per batch]},
     "weight_load_s", "worker_start_s", "role_flip_s", "kv_bytes_per_token",
     "copy_bandwidth_gbps", "matmul_tflops"}

`PerfProfile` reads it (or `tandem.profile.schema`'s object when that module exists) and answers:

* `prefill_time(n, cached)`   time to prefill n new tokens after `cached` cached ones, chunked by
                               `max_num_batched_tokens` as the engine does;
* `prefill_capacity_tps(isl)` prompt tokens/s of one saturated prefill worker for prompts of that
                               mean length (chunks packed to the token budget);
* `knee_tokens()`             smallest step size reaching 90 % of the best prefill throughput;
* `decode_step_time(b, ctx)`  bilinear in (batch, context), linear extrapolation outside the grid;
* `max_decode_batch(ctx, tpot_s, kv_frac)`  largest batch whose step time meets the TPOT target
                               and whose KV fits, hence `decode_capacity_tps`.

`workers_needed(demand, profile, ...)` turns a predicted demand (request rate, mean uncached ISL,
mean OSL, backlog, in-flight decodes) into the number of prefill and decode workers that meet the
SLOs. Prefill is sized as an M/D/c queue (Erlang C with the usual 1/2 correction for deterministic
service): the p90 queueing wait plus the prompt's own prefill and KV transfer must fit in the TTFT
target, and utilisation must stay below `prefill_util_max`. Decode is sized by throughput at the
TPOT-constrained batch, with utilisation headroom, and by the in-flight decode count.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from tandem.planner.types import finite, nonneg

# ----------------------------------------------------------------------------------- interpolation


def _seg_index(xs: Sequence[float], x: float) -> int:
    """Index i of the segment [xs[i], xs[i+1]] that holds x, or the end segment x extrapolates from (n >= 2)."""
    n = len(xs)
    if x <= xs[0]:
        return 0
    if x >= xs[-1]:
        return n - 2
    return max(0, min(n - 2, bisect.bisect_right(xs, x) - 1))


def interp1(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x); linear extrapolation with the end segments' slopes, result >= 0."""
    n = len(xs)
    if n == 0:
        return 0.0
    if n == 1:
        return max(0.0, float(ys[0]) * (x / xs[0]) if xs[0] > 0 else float(ys[0]))
    i = _seg_index(xs, x)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    if x1 == x0:
        return max(0.0, float(y0))
    v = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(0.0, float(v)) if math.isfinite(v) else 0.0


def _seg(xs: Sequence[float], x: float) -> tuple[int, float]:
    """Segment index and fraction (may be < 0 or > 1 when extrapolating)."""
    n = len(xs)
    if n == 1:
        return 0, 0.0
    i = _seg_index(xs, x)
    d = xs[i + 1] - xs[i]
    return i, ((x - xs[i]) / d) if d else 0.0


def interp2(xs: Sequence[float], ys: Sequence[float], z: Sequence[Sequence[float]], x: float,
            y: float) -> float:
    """Bilinear z(x, y) on a grid z[i][j] = z(xs[i], ys[j]); linear extrapolation; result >= 0."""
    if not xs or not ys:
        return 0.0
    i, fx = _seg(xs, x)
    j, fy = _seg(ys, y)
    i1 = min(i + 1, len(xs) - 1)
    j1 = min(j + 1, len(ys) - 1)
    z00, z01, z10, z11 = z[i][j], z[i][j1], z[i1][j], z[i1][j1]
    v = (z00 * (1 - fx) * (1 - fy) + z10 * fx * (1 - fy) + z01 * (1 - fx) * fy + z11 * fx * fy)
    return max(0.0, float(v)) if math.isfinite(v) else 0.0


# ------------------------------------------------------------------------------------ the profile

class ProfileError(ValueError):
    pass


def profile_floats(v: Any, what: str) -> list[float]:
    """A profile field as a list of finite non-negative floats (the simulator's loader checks the same way)."""
    try:
        out = [float(a) for a in v]
    except (TypeError, ValueError):
        raise ProfileError(f"profile field {what} must be a list of numbers") from None
    if not all(math.isfinite(a) and a >= 0 for a in out):
        raise ProfileError(f"profile field {what} must hold finite non-negative numbers")
    return out


def _sorted_pairs(xs: list[float], ys: list[float], what: str) -> tuple[list[float], list[float]]:
    if len(xs) != len(ys) or not xs:
        raise ProfileError(f"profile field {what}: x and time lists must be non-empty and equal length")
    pairs = sorted(zip(xs, ys))
    return [p[0] for p in pairs], [p[1] for p in pairs]


@dataclass
class PerfProfile:
    prefill_tokens: list[float]
    prefill_time_s: list[float]
    decode_batch: list[float]
    decode_context: list[float]
    decode_time_s: list[list[float]]          # [batch index][context index]
    kv_capacity_tokens: int = 0
    max_num_batched_tokens: int = 0
    block_size: int = 16
    prefill_ctx_cached: list[float] = field(default_factory=list)
    prefill_ctx_new_tokens: int = 0
    prefill_ctx_time_s: list[float] = field(default_factory=list)
    weight_load_s: float = 0.0
    worker_start_s: float = 0.0
    role_flip_s: float = 0.0
    kv_bytes_per_token: float = 0.0
    copy_bandwidth_gbps: float = 0.0
    matmul_tflops: float = 0.0
    model: str = ""
    device: str = ""
    dtype: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._cache: dict = {}

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, d: dict) -> "PerfProfile":
        if not isinstance(d, dict):
            raise ProfileError("a perf profile must be a JSON object")
        try:
            pf, dc = d["prefill"], d["decode"]
        except KeyError as e:
            raise ProfileError(f"perf profile lacks the {e.args[0]!r} section") from None
        pt, ps = _sorted_pairs(profile_floats(pf.get("tokens", []), "prefill.tokens"),
                               profile_floats(pf.get("time_s", []), "prefill.time_s"), "prefill")
        batch = profile_floats(dc.get("batch", []), "decode.batch")
        ctx = profile_floats(dc.get("context", []), "decode.context")
        grid = dc.get("time_s", [])
        if not batch or not ctx or len(grid) != len(batch) or any(len(r) != len(ctx) for r in grid):
            raise ProfileError("decode.time_s must be a [len(batch)][len(context)] grid")
        grid = [profile_floats(r, "decode.time_s") for r in grid]
        bi = sorted(range(len(batch)), key=lambda i: batch[i])
        ci = sorted(range(len(ctx)), key=lambda j: ctx[j])
        batch = [batch[i] for i in bi]
        ctx = [ctx[j] for j in ci]
        grid = [[grid[i][j] for j in ci] for i in bi]
        pc = d.get("prefill_ctx") or {}
        cc, ct = [], []
        if pc.get("cached_tokens") and pc.get("time_s"):
            cc, ct = _sorted_pairs(profile_floats(pc["cached_tokens"], "prefill_ctx.cached_tokens"),
                                   profile_floats(pc["time_s"], "prefill_ctx.time_s"), "prefill_ctx")
        g = lambda k, dflt=0.0: nonneg(d.get(k), dflt)  # noqa: E731
        return cls(prefill_tokens=pt, prefill_time_s=ps, decode_batch=batch, decode_context=ctx,
                   decode_time_s=grid, kv_capacity_tokens=int(g("kv_capacity_tokens")),
                   max_num_batched_tokens=int(g("max_num_batched_tokens")),
                   block_size=int(g("block_size", 16)) or 16,
                   prefill_ctx_cached=cc, prefill_ctx_new_tokens=int(nonneg(pc.get("new_tokens"))),
                   prefill_ctx_time_s=ct, weight_load_s=g("weight_load_s"),
                   worker_start_s=g("worker_start_s"), role_flip_s=g("role_flip_s"),
                   kv_bytes_per_token=g("kv_bytes_per_token"),
                   copy_bandwidth_gbps=g("copy_bandwidth_gbps"), matmul_tflops=g("matmul_tflops"),
                   model=str(d.get("model", "")), device=str(d.get("device", "")),
                   dtype=str(d.get("dtype", "")), raw=d)

    @classmethod
    def load(cls, path: str) -> "PerfProfile":
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ProfileError(f"perf profile not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ProfileError(f"perf profile {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def coerce(cls, src: Any) -> "PerfProfile":
        """A `PerfProfile` from a path, a dict, a PerfProfile, or tandem.profile's object."""
        if isinstance(src, PerfProfile):
            return src
        if isinstance(src, str):
            return cls.load(src)
        if isinstance(src, dict):
            return cls.from_dict(src)
        for attr in ("to_dict", "as_dict", "model_dump", "dict"):
            fn = getattr(src, attr, None)
            if callable(fn):
                return cls.from_dict(fn())
        if hasattr(src, "__dataclass_fields__"):
            from dataclasses import asdict
            return cls.from_dict(asdict(src))
        raise ProfileError(f"cannot read a perf profile from {type(src).__name__}")

    def to_dict(self) -> dict:
        if self.raw:
            return self.raw
        return {"model": self.model, "device": self.device, "dtype": self.dtype,
                "block_size": self.block_size, "kv_capacity_tokens": self.kv_capacity_tokens,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "prefill": {"tokens": self.prefill_tokens, "time_s": self.prefill_time_s},
                "prefill_ctx": {"cached_tokens": self.prefill_ctx_cached,
                                "new_tokens": self.prefill_ctx_new_tokens,
                                "time_s": self.prefill_ctx_time_s},
                "decode": {"batch": self.decode_batch, "context": self.decode_context,
                           "time_s": self.decode_time_s},
                "weight_load_s": self.weight_load_s, "worker_start_s": self.worker_start_s,
                "role_flip_s": self.role_flip_s, "kv_bytes_per_token": self.kv_bytes_per_token,
                "copy_bandwidth_gbps": self.copy_bandwidth_gbps, "matmul_tflops": self.matmul_tflops}

    # ------------------------------------------------------------------------------- prefill
    @property
    def chunk_tokens(self) -> int:
        """Largest prefill step: the engine's token budget, else the largest profiled size."""
        if self.max_num_batched_tokens > 0:
            return int(self.max_num_batched_tokens)
        return int(max(self.prefill_tokens)) if self.prefill_tokens else 2048

    def _step_time(self, n: float) -> float:
        return interp1(self.prefill_tokens, self.prefill_time_s, max(0.0, n))

    def _ctx_extra(self, cached: float, chunk: float) -> float:
        """Extra attention time of a `chunk` prefilled after `cached` tokens (vs. no cache)."""
        if cached <= 0 or not self.prefill_ctx_cached or self.prefill_ctx_new_tokens <= 0:
            return 0.0
        t0 = interp1(self.prefill_ctx_cached, self.prefill_ctx_time_s, 0.0)
        tc = interp1(self.prefill_ctx_cached, self.prefill_ctx_time_s, cached)
        return max(0.0, tc - t0) * chunk / self.prefill_ctx_new_tokens

    def prefill_time(self, n: float, cached: float = 0.0) -> float:
        """Seconds to prefill n new tokens after `cached` cached ones, alone on the worker."""
        n, cached = min(nonneg(n), 1e12), min(nonneg(cached), 1e12)
        if n <= 0:
            return 0.0
        key = ("pt", int(n), int(cached))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        m = self.chunk_tokens
        t, done = 0.0, 0.0
        k = 0
        while done < n and k < 512:
            c = min(m, n - done)
            t += self._step_time(c) + self._ctx_extra(cached + done, c)
            done += c
            k += 1
        if done < n:  # absurdly long prompt: extrapolate at the last chunk's cost per token
            last = self._step_time(m) + self._ctx_extra(cached + done, m)
            t += (n - done) / m * last
        if len(self._cache) < 100_000:
            self._cache[key] = t
        return t

    def prefill_capacity_tps(self, isl: float = 0.0) -> float:
        """Prompt tokens/s of one saturated prefill worker, prompts of mean length `isl`.

        Short prompts are packed into full steps of `chunk_tokens`; long prompts are chunked and
        pay the growing attention cost of their own earlier chunks. A saturated worker packs a
        prompt's last, partial chunk into a full step with the next prompt's first chunk, so the
        tail costs its share of a full step, not a step of its own (charging the lone-prompt time
        under-rated capacity by ~30 % for 2-3k-token prompts on the measured H100 8B profile).
        """
        m = self.chunk_tokens
        step_m = max(self._step_time(m), 1e-9)
        full = m / step_m
        isl = min(nonneg(isl), 1e12)
        if isl <= m:
            return full
        key = ("cap", int(isl))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        t, done, k = 0.0, 0.0, 0
        while done < isl and k < 512:
            c = min(m, isl - done)
            t += step_m * c / m + self._ctx_extra(done, c)
            done += c
            k += 1
        if done < isl:  # absurdly long prompt: the last chunk's cost per token
            t += (isl - done) / m * (step_m + self._ctx_extra(done, m))
        cap = min(full, isl / max(t, 1e-9))
        if len(self._cache) < 100_000:
            self._cache[key] = cap
        return cap

    def knee_tokens(self, frac: float = 0.9) -> int:
        """Smallest profiled step size whose throughput is >= frac x the best one (<= chunk)."""
        pts = [(n, n / t) for n, t in zip(self.prefill_tokens, self.prefill_time_s)
               if t > 0 and n > 0 and n <= self.chunk_tokens]
        if not pts:
            return self.chunk_tokens
        best = max(r for _, r in pts)
        return int(min(n for n, r in pts if r >= frac * best))

    def kv_transfer_time(self, tokens: float) -> float:
        bw = self.copy_bandwidth_gbps * 1e9
        if bw <= 0 or self.kv_bytes_per_token <= 0:
            return 0.0
        return nonneg(tokens) * self.kv_bytes_per_token / bw

    # -------------------------------------------------------------------------------- decode
    def decode_step_time(self, batch: float, context: float) -> float:
        return interp2(self.decode_batch, self.decode_context, self.decode_time_s,
                       max(1.0, nonneg(batch, 1.0)), nonneg(context))

    def max_decode_batch(self, context: float, tpot_s: float, kv_frac: float = 0.9,
                         kv_capacity_tokens: int = 0, max_batch: int = 0) -> tuple[int, float, bool]:
        """(largest batch b, its step time, feasible): step(b, ctx) <= tpot_s and b x ctx fits in
        kv_frac of the KV cache. Not feasible (b = 1) when even batch 1 misses the target."""
        context = max(1.0, nonneg(context, 1.0))
        tpot_s = nonneg(tpot_s)
        kvcap = kv_capacity_tokens or self.kv_capacity_tokens
        key = ("mb", int(context // 32), round(tpot_s, 5), round(kv_frac, 3), int(kvcap),
               int(max_batch))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if kvcap > 0:
            hi = max(1, int(kvcap * kv_frac // context))
        else:
            hi = int(max(self.decode_batch) * 4) if self.decode_batch else 1
        hi = min(hi, 1 << 16)
        if max_batch > 0:
            hi = min(hi, int(max_batch))
        if self.decode_step_time(1, context) > tpot_s:
            res = (1, self.decode_step_time(1, context), False)
        else:
            lo = 1  # invariant: step(lo) <= tpot
            if self.decode_step_time(hi, context) <= tpot_s:
                lo = hi
            else:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self.decode_step_time(mid, context) <= tpot_s:
                        lo = mid
                    else:
                        hi = mid
            res = (lo, self.decode_step_time(lo, context), True)
        if len(self._cache) < 100_000:
            self._cache[key] = res
        return res

    def decode_capacity_tps(self, context: float, tpot_s: float, kv_frac: float = 0.9,
                            kv_capacity_tokens: int = 0) -> float:
        b, t, _ = self.max_decode_batch(context, tpot_s, kv_frac, kv_capacity_tokens)
        return b / t if t > 0 else 0.0


def load_profile(src: Any) -> PerfProfile:
    """Read a perf profile; uses `tandem.profile.schema` when it exists (torch-free), else ours."""
    if isinstance(src, str):
        try:  # the profile engineer's loader, if it has landed
            from tandem.profile import schema as _schema  # type: ignore
            for name in ("load_profile", "load", "read_profile"):
                fn = getattr(_schema, name, None)
                if callable(fn):
                    try:
                        return PerfProfile.coerce(fn(src))
                    except ProfileError:
                        raise
                    except Exception:  # noqa: BLE001 - fall back to our reader
                        break
        except ImportError:
            pass
    return PerfProfile.coerce(src)


# ------------------------------------------------------------------------------------ queueing

def erlang_c(c: int, a: float) -> float:
    """Probability of waiting in M/M/c with offered load a (= lambda x mean service time)."""
    a = nonneg(a)
    if c <= 0:
        return 1.0
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = 1.0
    for k in range(1, c + 1):       # Erlang B recursion, numerically stable
        b = a * b / (k + a * b)
    rho = a / c
    return min(1.0, b / (1.0 - rho * (1.0 - b)))


def _wait_quantile(c: int, a: float, service_s: float, q: float, erl_b: float) -> float:
    """p-q queueing wait of M/D/c (half of M/M/c's exponential tail), given Erlang B(c, a)."""
    if a >= c:
        return math.inf
    rho = a / c
    cw = min(1.0, erl_b / (1.0 - rho * (1.0 - erl_b)))
    tail = 1.0 - q
    if cw <= tail or service_s <= 0:
        return 0.0
    return 0.5 * service_s * math.log(cw / tail) / (c - a)


def mdc_wait_quantile(c: int, a: float, service_s: float, q: float = 0.9) -> float:
    """p-q queueing wait of an M/D/c queue (approximation); inf when a >= c."""
    if c <= 0:
        return math.inf
    a = nonneg(a)
    if a <= 0:
        return 0.0
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return _wait_quantile(c, a, service_s, q, b)


# -------------------------------------------------------------------------------- worker counts

@dataclass
class Demand:
    """Predicted demand for the next window."""
    rate: float = 0.0                    # requests/s
    isl: float = 0.0                     # mean uncached prompt tokens per request
    osl: float = 0.0                     # mean output tokens per request
    isl_p90: float = 0.0                 # for the TTFT of long prompts (0: use isl)
    context: float = 0.0                 # mean decode context (0: isl_total + osl / 2)
    prefill_backlog_tokens: float = 0.0  # queued prompt tokens that must drain
    decode_inflight: float = 0.0         # requests decoding or waiting for a decode slot now

    @property
    def prefill_tps(self) -> float:
        return nonneg(self.rate) * nonneg(self.isl)

    @property
    def decode_tps(self) -> float:
        return nonneg(self.rate) * nonneg(self.osl)

    def is_zero(self) -> bool:
        return (self.prefill_tps <= 1e-9 and self.decode_tps <= 1e-9
                and nonneg(self.prefill_backlog_tokens) <= 0 and nonneg(self.decode_inflight) <= 0)


@dataclass
class Need:
    prefill: int                # prefill workers that meet the TTFT target
    decode: int                 # decode workers that meet the TPOT target
    prefill_load: float         # offered prefill load in workers at planned utilisation (float)
    decode_load: float          # offered decode load in workers at planned utilisation (float)
    prefill_feasible: bool = True
    decode_feasible: bool = True
    info: dict = field(default_factory=dict)


def prefill_workers_needed(d: Demand, p: PerfProfile, ttft_s: float, util_max: float = 0.85,
                           drain_s: float = 4.0, quantile: float = 0.9,
                           max_workers: int = 100_000) -> tuple[int, float, bool, dict]:
    """(workers, offered load in workers / util_max, feasible, info) for the TTFT target."""
    isl = nonneg(d.isl)
    rate = nonneg(d.rate)
    backlog = nonneg(d.prefill_backlog_tokens)
    cap = p.prefill_capacity_tps(isl if isl > 0 else p.chunk_tokens)
    if cap <= 0:
        return 0, 0.0, False, {"error": "prefill capacity is 0"}
    service = isl / cap if isl > 0 else 0.0
    a = rate * service + backlog / (max(drain_s, 1e-3) * cap)       # busy workers
    long_isl = max(nonneg(d.isl_p90), isl)
    own = max(p.prefill_time(long_isl), long_isl / cap) + p.kv_transfer_time(long_isl)
    slack = nonneg(ttft_s) - own
    info = {"prefill_cap_tps": cap, "service_s": service, "offered_workers": a,
            "ttft_own_s": own, "queue_slack_s": slack}
    if a <= 0:
        return 0, 0.0, slack > 0, info
    c = max(1, math.ceil(a / util_max - 1e-9))
    feasible = slack > 0
    if c >= max_workers:
        return max_workers, a / util_max, feasible, info
    if feasible and service > 0:
        b = 1.0
        for k in range(1, c + 1):
            b = a * b / (k + a * b)
        while c < max_workers and _wait_quantile(c, a, service, quantile, b) > slack:
            c += 1
            b = a * b / (c + a * b)
        info["queue_wait_q_s"] = _wait_quantile(c, a, service, quantile, b)
    return min(c, max_workers), a / util_max, feasible, info


def decode_workers_needed(d: Demand, p: PerfProfile, tpot_s: float, util_max: float = 0.9,
                          kv_frac: float = 0.9, kv_capacity_tokens: int = 0, max_batch: int = 0
                          ) -> tuple[int, float, bool, dict]:
    """(workers, offered load in workers / util_max, feasible, info) for the TPOT target."""
    ctx = nonneg(d.context) or (nonneg(d.isl) + nonneg(d.osl) / 2.0)
    b, step, feasible = p.max_decode_batch(max(ctx, 1.0), tpot_s, kv_frac, kv_capacity_tokens,
                                           max_batch)
    thr = b / step if step > 0 else 0.0
    info = {"decode_batch_max": b, "decode_step_s": step, "decode_cap_tps": thr, "context": ctx}
    if thr <= 0:
        return 0, 0.0, False, info
    by_tps = d.decode_tps / thr                        # workers busy at the TPOT batch
    by_inflight = nonneg(d.decode_inflight) / b        # slots for what is decoding now
    load = max(by_tps, by_inflight) / util_max
    info.update(by_tps=by_tps, by_inflight=by_inflight)
    return (math.ceil(load - 1e-9) if load > 0 else 0), load, feasible, info


def workers_needed(d: Demand, p: PerfProfile, ttft_s: float, tpot_s: float, *,
                   prefill_util_max: float = 0.85, decode_util_max: float = 0.9,
                   kv_frac: float = 0.9, drain_s: float = 4.0,
                   kv_capacity_tokens: int = 0, max_workers: int = 100_000,
                   max_batch: int = 0) -> Need:
    np_, lp, fp, ip = prefill_workers_needed(d, p, ttft_s, prefill_util_max, drain_s,
                                             max_workers=max_workers)
    nd, ld, fd, idd = decode_workers_needed(d, p, tpot_s, decode_util_max, kv_frac,
                                            kv_capacity_tokens, max_batch)
    return Need(np_, nd, lp, ld, fp, fd, {**ip, **idd})
