"""Perf profile for the simulator: load a `tandem profile` JSON and turn batches into step times.

Schema (written by `tandem profile`; see docs/sim.md)::

    {"model", "preset", "device", "dtype", "date", "command", "block_size", "kv_capacity_tokens",
     "max_num_batched_tokens",
     "prefill":     {"tokens": [...], "time_s": [...]},
     "prefill_ctx": {"cached_tokens": [...], "new_tokens": int, "time_s": [...]},
     "decode":      {"batch": [...], "context": [...], "time_s": [[per context] per batch]},
     "weight_load_s", "worker_start_s", "role_flip_s", "kv_bytes_per_token",
     "copy_bandwidth_gbps", "matmul_tflops",
     "serving_overhead": {"step_s", "seq_s", "new_s", "request_s", "new_q", "source"}}   # optional: ServingOverhead

`copy_bandwidth_gbps` is in GB/s (1e9 bytes/s), as the planner reads it.

Step-time model of one engine step (all curves piecewise linear, linear extrapolation outside the
measured points, never negative):

* P(n)        = prefill time of n tokens (``prefill``), one request, nothing cached;
* X(c, n)     = extra attention time of n new tokens after c cached ones
                = (Q(c) - Q(0)) * n / new_tokens with Q the ``prefill_ctx`` curve;
* D(b, c)     = decode step time of batch b at mean context c (``decode``, bilinear).

A step with decodes (b sequences, mean context c: the sequence length including the token being
computed) and prefill chunks (n_i new tokens after c_i computed ones, N = sum n_i, X = sum X(c_i, n_i))
takes D(b, c) when it has no prefill, P(N) + X when it has no decode, and otherwise, by the profile's
``mixed_model`` (the one `tandem profile` found to fit measured mixed steps; default "shared"), the
same formulas as `tandem.profile.schema.Profile.mixed_step_time`:

* shared: max(P(N + b) + X (N + b) / N, D(b, 0)) + (D(b, c) - D(b, 0))   (decode rows ride in the
          chunk's matmuls, plus their KV reads; the context term is schema's X(c, N + b))
* sum:    P(N) + X + D(b, c)                                 (no overlap; an upper bound)
* max:    max(P(N) + X, D(b, c))                             (perfect overlap; a lower bound)

Pure batches reproduce the profile exactly. The simulated engine adds the serving path's host time
(optional ``serving_overhead`` section, `ServingOverhead`; old profiles read as 0): a per step plus s
per sequence in the step plus n per request scheduled for the first time: a step of b sequences, k of
them new, takes T(profile) + a + s * b + n * k. The admission time n is heavy-tailed on a real server;
with ``new_q`` (its measured quantiles) each request draws its own n from them, by its id. With
``new_per`` = "prefill_step" (what calibrate writes) n is charged once per step that holds prefill work
instead, drawn by (first prefill's id, its chunk start): real run 3 showed full 2048-token chunk steps
costing the same with 0, 1 or 2 prompts admitted, so n is a per-step cost of the eager prefill path,
not a per-prompt one (per prompt over-charged packed chunks of short prompts: code-burst TPOT +34%).

Torch-free. `synthetic_profile()` builds a roofline profile labelled synthetic (tests, what-ifs).
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from tandem.planner.capacity import ProfileError, profile_floats


MIXED_MODELS = ("shared", "sum", "max")
NEW_PER = ("request", "prefill_step")


def _floats(v: Any, what: str) -> list[float]:
    out = profile_floats(v, what)
    if not out:
        raise ProfileError(f"profile field {what} is empty")
    return out


def _pairs(xs: list[float], ys: list[float], what: str) -> tuple[list[float], list[float]]:
    if len(xs) != len(ys):
        raise ProfileError(f"profile field {what}: x and time_s lists differ in length")
    pts = sorted(zip(xs, ys))
    return [p[0] for p in pts], [p[1] for p in pts]


class Curve:
    """Piecewise-linear y(x) with linear extrapolation at both ends (result clamped at >= 0)."""

    __slots__ = ("xs", "ys", "slopes", "n")

    def __init__(self, xs: Sequence[float], ys: Sequence[float]):
        self.xs = [float(x) for x in xs]
        self.ys = [float(y) for y in ys]
        self.n = len(self.xs)
        if self.n == 1:                              # one point: constant
            self.xs, self.ys = [self.xs[0], self.xs[0] + 1.0], [self.ys[0], self.ys[0]]
            self.n = 2
        self.slopes = []
        for i in range(self.n - 1):
            dx = self.xs[i + 1] - self.xs[i]
            self.slopes.append((self.ys[i + 1] - self.ys[i]) / dx if dx > 0 else 0.0)

    def __call__(self, x: float) -> float:
        i = bisect.bisect_right(self.xs, x) - 1
        if i < 0:
            i = 0
        elif i > self.n - 2:
            i = self.n - 2
        v = self.ys[i] + self.slopes[i] * (x - self.xs[i])
        return v if v > 0.0 else 0.0

    def raw(self, x: float) -> float:
        """Without the clamp at zero."""
        i = min(max(bisect.bisect_right(self.xs, x) - 1, 0), self.n - 2)
        return self.ys[i] + self.slopes[i] * (x - self.xs[i])


@dataclass(frozen=True)
class ServingOverhead:
    """Host time of the serving path that an isolated engine step (what the profile's curves time)
    does not contain: per step (worker loop, output message), per sequence in a step (its delta:
    built, encoded, streamed), per request in its first step (admission: request state, prefill
    inputs) and per request outside the worker (HTTP in/out, routing: `request_s`, before the
    router). Profiles without the ``serving_overhead`` section read as zeros (pure engine). `python -m tandem.sim.calibrate` measures
    the step terms from a real run's token timeline and writes them here."""
    step_s: float = 0.0
    seq_s: float = 0.0
    new_s: float = 0.0
    request_s: float = 0.0
    source: str = ""
    new_q: tuple | None = None      # quantiles (s, ascending, p0..p100) of the admission time; else new_s
    new_per: str = "request"        # new_s/new_q charged per request in its first step, or once per
                                    # "prefill_step" (a step holding prefill work, however many prompts)

    @classmethod
    def from_dict(cls, d: Any) -> "ServingOverhead":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ProfileError("profile field serving_overhead must be an object")
        vals = {}
        for k in ("step_s", "seq_s", "new_s", "request_s"):
            v = d.get(k, 0.0)
            try:
                v = float(v if v is not None else 0.0)
            except (TypeError, ValueError):
                raise ProfileError(f"profile field serving_overhead.{k} must be a number") from None
            if not (math.isfinite(v) and v >= 0):
                raise ProfileError(f"profile field serving_overhead.{k} must be finite and >= 0")
            vals[k] = v
        q = d.get("new_q")
        if q is not None:
            try:
                q = tuple(float(x) for x in q)
            except (TypeError, ValueError):
                raise ProfileError("profile field serving_overhead.new_q must be a list of numbers") from None
            if len(q) < 2 or not all(math.isfinite(x) and abs(x) < 60 for x in q) or list(q) != sorted(q):
                raise ProfileError("profile field serving_overhead.new_q must be >= 2 ascending finite quantiles")
        per = d.get("new_per") or "request"
        if per not in NEW_PER:
            raise ProfileError(f"profile field serving_overhead.new_per must be one of {NEW_PER}, got {per!r}")
        return cls(source=str(d.get("source") or ""), new_q=q, new_per=per, **vals)

    def to_dict(self) -> dict:
        return {"step_s": self.step_s, "seq_s": self.seq_s, "new_s": self.new_s, "request_s": self.request_s,
                "new_q": list(self.new_q) if self.new_q else None, "new_per": self.new_per, "source": self.source}


class SimProfile:
    """A perf profile with the simulator's step-time model (see the module docstring)."""

    def __init__(self, d: dict, source: str | None = None):
        if not isinstance(d, dict):
            raise ProfileError("a perf profile must be a JSON object")
        try:
            pf, dc = d["prefill"], d["decode"]
        except KeyError as e:
            raise ProfileError(f"perf profile lacks the {e.args[0]!r} section") from None
        self.raw = d
        self.source = source
        pt, ps = _pairs(_floats(pf.get("tokens", []), "prefill.tokens"),
                        _floats(pf.get("time_s", []), "prefill.time_s"), "prefill")
        self._P = Curve(pt, ps)
        batch = _floats(dc.get("batch", []), "decode.batch")
        ctx = _floats(dc.get("context", []), "decode.context")
        grid = dc.get("time_s", [])
        if len(grid) != len(batch) or any(len(r) != len(ctx) for r in grid):
            raise ProfileError("decode.time_s must be a [len(batch)][len(context)] grid")
        grid = [_floats(r, "decode.time_s") for r in grid]
        bi = sorted(range(len(batch)), key=lambda i: batch[i])
        ci = sorted(range(len(ctx)), key=lambda j: ctx[j])
        self.decode_batch = [batch[i] for i in bi]
        self.decode_context = [ctx[j] for j in ci]
        self.decode_grid = [[grid[i][j] for j in ci] for i in bi]
        self._rows: dict[int, Curve] = {}          # batch -> D(b, .) as a curve in context
        self._d0: dict[int, float] = {}             # batch -> D(b, 0)
        pc = d.get("prefill_ctx") or {}
        self._ctx_slope = None                      # X(c, n) = n * ctx_per_token(c)
        if pc.get("cached_tokens") and pc.get("time_s") and float(pc.get("new_tokens") or 0) > 0:
            cc, ct = _pairs(_floats(pc["cached_tokens"], "prefill_ctx.cached_tokens"),
                            _floats(pc["time_s"], "prefill_ctx.time_s"), "prefill_ctx")
            self._Q = Curve(cc, ct)
            self._Q0 = self._Q.raw(0.0)
            self._ctx_slope = 1.0 / float(pc["new_tokens"])
        self.mixed_model = str(d.get("mixed_model") or "shared")
        if self.mixed_model not in MIXED_MODELS:
            raise ProfileError(f"mixed_model must be one of {MIXED_MODELS}, got {self.mixed_model!r}")

        def num(k, dflt=0.0):
            v = d.get(k, dflt)
            try:
                v = float(v)
            except (TypeError, ValueError):
                return dflt
            return v if math.isfinite(v) and v >= 0 else dflt
        self.model = str(d.get("model", ""))
        self.device = str(d.get("device", ""))
        self.synthetic = bool(d.get("synthetic", False))
        self.block_size = int(num("block_size", 16)) or 16
        self.kv_capacity_tokens = int(num("kv_capacity_tokens", 0))
        self.max_num_batched_tokens = int(num("max_num_batched_tokens", 0)) or 2048
        self.max_model_len = int(num("max_model_len", 0)) or None
        self.weight_load_s = num("weight_load_s")
        self.worker_start_s = num("worker_start_s")
        self.role_flip_s = num("role_flip_s")        # null in a profile: not measured -> 0 (override: --role-flip-s)
        self.kv_bytes_per_token = num("kv_bytes_per_token")
        self.copy_bandwidth_gbps = num("copy_bandwidth_gbps")
        self.serving = ServingOverhead.from_dict(d.get("serving_overhead"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str) -> "SimProfile":
        if path.startswith("synthetic"):
            _, _, size = path.partition(":")
            return cls(synthetic_profile(**_SYNTH.get(size or "8b", {})), source=path)  # type: ignore[arg-type]
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ProfileError(f"perf profile not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read perf profile {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ProfileError(f"perf profile {path} is not valid JSON: {e}") from None
        return cls(d, source=path)

    @classmethod
    def coerce(cls, src: Any) -> "SimProfile":
        if isinstance(src, SimProfile):
            return src
        if isinstance(src, dict):
            return cls(src)
        if isinstance(src, str):
            return cls.load(src)
        for attr in ("to_dict", "as_dict"):
            fn = getattr(src, attr, None)
            if callable(fn):
                return cls(fn())
        raise ProfileError(f"cannot read a perf profile from {type(src).__name__}")

    def to_dict(self) -> dict:
        return self.raw

    def describe(self) -> dict:
        """What the report's config records about the profile."""
        d = self.raw
        return {k: d.get(k) for k in ("model", "preset", "device", "dtype", "date", "command", "synthetic")
                if k in d} | {"source": self.source}

    # ------------------------------------------------------------------ curves
    def prefill_time(self, n: float, cached: float = 0.0) -> float:
        """One step prefilling n new tokens after `cached` computed ones (no chunking)."""
        if n <= 0:
            return 0.0
        return self._P(n) + self.ctx_extra(cached, n)

    def ctx_extra(self, cached: float, n: float) -> float:
        if cached <= 0 or self._ctx_slope is None:
            return 0.0
        v = self._Q.raw(cached) - self._Q0
        return v * n * self._ctx_slope if v > 0.0 else 0.0

    def linear_time(self, n: float) -> float:
        """P(n): the prefill curve (time of a step of n tokens with no cached context)."""
        return self._P(n)

    def decode_row(self, b: int) -> Curve:
        """D(b, .) as a curve in context (interpolated/extrapolated in batch), memoised."""
        row = self._rows.get(b)
        if row is None:
            xs = self.decode_batch
            if len(xs) == 1:
                vals = list(self.decode_grid[0])
            else:
                i = bisect.bisect_right(xs, b) - 1
                i = 0 if i < 0 else (len(xs) - 2 if i > len(xs) - 2 else i)
                dx = xs[i + 1] - xs[i]
                f = (b - xs[i]) / dx if dx > 0 else 0.0
                r0, r1 = self.decode_grid[i], self.decode_grid[i + 1]
                vals = [r0[j] + (r1[j] - r0[j]) * f for j in range(len(r0))]
            row = Curve(self.decode_context, vals)
            self._rows[b] = row
        return row

    def decode_time(self, b: int, context: float) -> float:
        """D(b, c): one decode step of b sequences at mean context c."""
        if b <= 0:
            return 0.0
        return self.decode_row(b)(context)

    def step_time(self, n_decode: int, decode_ctx_sum: float, prefill_tokens: int,
                  prefill_ctx_extra: float = 0.0) -> float:
        """Step time of a batch (module docstring); `prefill_ctx_extra` = sum of the chunks' ctx_extra."""
        if prefill_tokens <= 0:
            return self.decode_row(n_decode)(decode_ctx_sum / n_decode) if n_decode > 0 else 0.0
        p = self._P(prefill_tokens) + prefill_ctx_extra
        if n_decode <= 0:
            return p
        row = self.decode_row(n_decode)
        d = row(decode_ctx_sum / n_decode)
        m = self.mixed_model
        if m == "shared":
            d0 = self._d0.get(n_decode)
            if d0 is None:
                d0 = self._d0[n_decode] = row(0.0)
            # as schema's prefill_time(N + b, cached): the context term scaled to N + b tokens
            a = self._P(prefill_tokens + n_decode) + prefill_ctx_extra * (prefill_tokens + n_decode) / prefill_tokens
            return (a if a > d0 else d0) + (d - d0 if d > d0 else 0.0)
        if m == "sum":
            return p + d
        return p if p > d else d

    def mixed_step_time(self, prefill_tokens: int, prefill_cached: int, decode_batch: int, decode_ctx: float,
                        model: str | None = None) -> float:
        """`tandem.profile.schema.Profile.mixed_step_time` (one prefill chunk + a decode batch)."""
        if model is not None and model != self.mixed_model:
            saved, self.mixed_model = self.mixed_model, model
            try:
                return self.mixed_step_time(prefill_tokens, prefill_cached, decode_batch, decode_ctx)
            finally:
                self.mixed_model = saved
        return self.step_time(decode_batch, decode_batch * decode_ctx, prefill_tokens,
                              self.ctx_extra(prefill_cached, prefill_tokens))

    # ------------------------------------------------------------------ transfer / capacity
    def transfer_time(self, tokens: int, gbps: float | None = None, latency_s: float = 0.0) -> float:
        """Seconds to move `tokens` tokens of KV at `gbps` GB/s (default: the profile's bandwidth)."""
        bw = (gbps if gbps is not None else self.copy_bandwidth_gbps) * 1e9
        if tokens <= 0:
            return latency_s
        if bw <= 0 or self.kv_bytes_per_token <= 0:
            return latency_s
        return latency_s + tokens * self.kv_bytes_per_token / bw

    def kv_blocks(self, block_size: int | None = None) -> int:
        bs = block_size or self.block_size
        if self.kv_capacity_tokens <= 0:
            raise ProfileError("perf profile has no kv_capacity_tokens; pass --kv-blocks")
        return max(1, self.kv_capacity_tokens // bs)


# --------------------------------------------------------------------------------- synthetic

_SYNTH = {
    "8b": dict(params_b=8.0, layers=32, kv_heads=8, head_dim=128),
    "1b": dict(params_b=1.24, layers=16, kv_heads=8, head_dim=64),
}


def synthetic_profile(params_b: float = 8.0, layers: int = 32, kv_heads: int = 8, head_dim: int = 128,
                      hbm_gb: float = 80.0, hbm_tbps: float = 3.0, tflops: float = 700.0,
                      mfu: float = 0.5, bw_eff: float = 0.7, step_overhead_s: float = 0.003,
                      max_num_batched_tokens: int = 2048, block_size: int = 16,
                      worker_start_s: float = 40.0, role_flip_s: float = 0.5,
                      copy_bandwidth_gbps: float = 390.0) -> dict:
    """A SYNTHETIC roofline profile (NOT a measurement) of a Llama-shaped model in bf16 on one
    H100-class GPU. Labelled ``"synthetic": true``; for tests and what-if runs only."""
    weights = params_b * 1e9 * 2
    kv_bpt = layers * kv_heads * head_dim * 2 * 2
    flops_tok = 2 * params_b * 1e9
    eff = tflops * 1e12 * mfu
    bw = hbm_tbps * 1e12 * bw_eff
    q_dim = kv_heads * head_dim * 4

    def prefill_t(n: float, cached: float = 0.0) -> float:
        return (step_overhead_s + max(n * flops_tok / eff, weights / bw)
                + 4 * layers * q_dim * n * (cached + n / 2) / eff)

    def decode_t(b: float, c: float) -> float:
        return step_overhead_s + max(weights / bw, b * flops_tok / eff) + b * c * kv_bpt / bw

    p_tokens = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    cached = [0, 1024, 4096, 8192, 16384, 32768]
    batch = [1, 8, 16, 32, 64, 128, 256]
    ctx = [128, 512, 1024, 2048, 4096, 8192, 16384]
    kv_cap = int((hbm_gb * 1e9 * 0.9 - weights - 4e9) / kv_bpt)
    return {
        "model": f"synthetic-llama-{params_b:g}b", "preset": None, "device": "synthetic-roofline-h100",
        "dtype": "bfloat16", "date": None, "synthetic": True,
        "command": "tandem.sim.profile.synthetic_profile()  (roofline estimate, NOT measured)",
        "block_size": block_size, "kv_capacity_tokens": kv_cap,
        "max_num_batched_tokens": max_num_batched_tokens,
        "prefill": {"tokens": p_tokens, "time_s": [prefill_t(n) for n in p_tokens]},
        "prefill_ctx": {"cached_tokens": cached, "new_tokens": 512,
                        "time_s": [prefill_t(512, c) for c in cached]},
        "decode": {"batch": batch, "context": ctx, "time_s": [[decode_t(b, c) for c in ctx] for b in batch]},
        "weight_load_s": round(weights / 2e9, 2), "worker_start_s": worker_start_s,
        "role_flip_s": role_flip_s, "kv_bytes_per_token": kv_bpt,
        "copy_bandwidth_gbps": copy_bandwidth_gbps, "matmul_tflops": tflops * mfu,
    }
