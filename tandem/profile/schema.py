"""The measured performance profile of one model on one GPU (`tandem profile` writes it; the
planner and the simulator read it). Torch-free: planner/sim/router import this.

JSON layout (exactly these keys; readers ignore extra ones):

    {"model", "preset", "device", "dtype", "date", "command",
     "block_size", "kv_capacity_tokens", "max_num_batched_tokens",          # the knee of prefill throughput
     "prefill": {"tokens": [...], "time_s": [...]},                         # one fresh prompt, no cache
     "prefill_ctx": {"cached_tokens": [...], "new_tokens": N, "time_s": [...]},   # N new tokens on cached context
     "decode": {"batch": [...], "context": [...], "time_s": [[per context] per batch]},   # one decode step
     "weight_load_s", "worker_start_s", "role_flip_s" (or null), "kv_bytes_per_token",
     "copy_bandwidth_gbps", "matmul_tflops"}

Optional extras written by the profiler: "mixed_model" (which of the mixed-step models below fit the
measured mixed steps best), "mixed_check" (the measurements behind that choice) and
"decode_extrapolated" (grid points beyond KV capacity that were extrapolated, not measured).

Interpolation: piecewise linear inside the measured range and linear extrapolation from the two
end points outside it (never below zero); the decode grid is bilinear in (batch, context).
"""
from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

MIXED_MODELS = ("shared", "sum", "max")


def interp1(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation over sorted xs; linear extrapolation past either end."""
    n = len(xs)
    if n == 0:
        raise ValueError("empty curve")
    if n == 1:
        return float(ys[0])
    i = bisect_right(xs, x) - 1
    i = min(max(i, 0), n - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    if x1 == x0:
        return float(y0)
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class Profile:
    model: str
    device: str
    dtype: str
    block_size: int
    kv_capacity_tokens: int
    max_num_batched_tokens: int
    prefill: dict
    prefill_ctx: dict
    decode: dict
    kv_bytes_per_token: int
    copy_bandwidth_gbps: float
    matmul_tflops: float
    weight_load_s: float = 0.0
    worker_start_s: float = 0.0
    role_flip_s: float | None = None
    preset: str | None = None
    date: str = ""
    command: str = ""
    extra: dict = field(default_factory=dict)    # optional keys (mixed_model, mixed_check, ...)

    _KEYS = ("model", "preset", "device", "dtype", "date", "command", "block_size", "kv_capacity_tokens",
             "max_num_batched_tokens", "prefill", "prefill_ctx", "decode", "weight_load_s", "worker_start_s",
             "role_flip_s", "kv_bytes_per_token", "copy_bandwidth_gbps", "matmul_tflops")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        out = {k: d[k] for k in self._KEYS}
        out.update(extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        missing = [k for k in cls._KEYS if k not in d and k not in ("preset", "date", "command", "role_flip_s")]
        if missing:
            raise ValueError(f"profile lacks keys {missing}")
        known = {k: d[k] for k in cls._KEYS if k in d}
        extra = {k: v for k, v in d.items() if k not in cls._KEYS}
        p = cls(**known, extra=extra)
        p.validate()
        return p

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> None:
        pt, ps = self.prefill["tokens"], self.prefill["time_s"]
        if not pt or len(pt) != len(ps) or list(pt) != sorted(pt):
            raise ValueError("prefill: tokens must be sorted, non-empty, one time per point")
        ct, cs = self.prefill_ctx["cached_tokens"], self.prefill_ctx["time_s"]
        if not ct or len(ct) != len(cs) or list(ct) != sorted(ct):
            raise ValueError("prefill_ctx: cached_tokens must be sorted, non-empty, one time per point")
        b, c, t = self.decode["batch"], self.decode["context"], self.decode["time_s"]
        if not b or not c or list(b) != sorted(b) or list(c) != sorted(c):
            raise ValueError("decode: batch and context must be sorted and non-empty")
        if len(t) != len(b) or any(len(row) != len(c) for row in t):
            raise ValueError("decode: time_s must be [len(batch)][len(context)]")

    # ------------------------------------------------------------------ model of step time
    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """Seconds to prefill `tokens` new tokens of one sequence on top of `cached` cached tokens.
        = fresh-prompt curve at `tokens` + the extra cost of attending to the cached context, taken from
        the prefill_ctx curve (measured at new_tokens) and scaled linearly with tokens / new_tokens."""
        if tokens <= 0:
            return 0.0
        t = max(0.0, interp1(self.prefill["tokens"], self.prefill["time_s"], tokens))
        if cached > 0:
            ct, cs = self.prefill_ctx["cached_tokens"], self.prefill_ctx["time_s"]
            base = interp1(ct, cs, 0)
            extra = max(0.0, interp1(ct, cs, cached) - base)
            t += extra * tokens / max(1, self.prefill_ctx["new_tokens"])
        return t

    def decode_time(self, batch: int, mean_context: float) -> float:
        """Seconds for one decode step of `batch` sequences whose mean context is `mean_context`
        (bilinear in (batch, context), linearly extrapolated outside the grid)."""
        if batch <= 0:
            return 0.0
        bs, cs, grid = self.decode["batch"], self.decode["context"], self.decode["time_s"]
        if len(bs) == 1:
            return max(0.0, interp1(cs, grid[0], mean_context))
        i = min(max(bisect_right(bs, batch) - 1, 0), len(bs) - 2)
        lo = interp1(cs, grid[i], mean_context)
        hi = interp1(cs, grid[i + 1], mean_context)
        b0, b1 = bs[i], bs[i + 1]
        return max(0.0, lo + (hi - lo) * (batch - b0) / (b1 - b0))

    def mixed_step_time(self, prefill_tokens: int, prefill_cached: int, decode_batch: int, decode_ctx: float,
                        model: str | None = None) -> float:
        """One engine step that runs a prefill chunk and a decode batch together.

        Models (the profile's "mixed_model" picks the default; the profiler sets it to the one that
        fit its measured mixed steps best, see "mixed_check"):
          shared: the decode rows ride along in the chunk's matmuls (weights are read once), so
                  max(prefill_time(P + D, cached), decode_time(D, 0)) + the decode's context-dependent
                  part (decode_time(D, ctx) - decode_time(D, 0)), i.e. its KV reads;
          sum:    prefill_time(P, cached) + decode_time(D, ctx) (no overlap at all; an upper bound);
          max:    max of the two (perfect overlap; a lower bound).
        """
        model = model or self.extra.get("mixed_model") or "shared"
        p = self.prefill_time(prefill_tokens, prefill_cached) if prefill_tokens > 0 else 0.0
        d = self.decode_time(decode_batch, decode_ctx) if decode_batch > 0 else 0.0
        if prefill_tokens <= 0:
            return d
        if decode_batch <= 0:
            return p
        if model == "sum":
            return p + d
        if model == "max":
            return max(p, d)
        if model == "shared":
            d0 = self.decode_time(decode_batch, 0)
            kv_part = max(0.0, d - d0)
            return max(self.prefill_time(prefill_tokens + decode_batch, prefill_cached), d0) + kv_part
        raise ValueError(f"unknown mixed model {model!r}; choose from {MIXED_MODELS}")

    def prefill_throughput(self, tokens: int) -> float:
        return tokens / self.prefill_time(tokens)


def find_knee(tokens: Sequence[int], times: Sequence[float], frac: float = 0.9) -> int:
    """Smallest measured prefill size whose throughput (tokens/s) reaches `frac` of the best: the
    token budget past which a bigger prefill batch buys little throughput but costs latency."""
    thr = [n / t for n, t in zip(tokens, times)]
    best = max(thr)
    for n, r in zip(tokens, thr):
        if r >= frac * best:
            return int(n)
    return int(tokens[-1])
