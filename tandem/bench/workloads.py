"""Synthetic workloads: chat, summarize, mixed, bursty. Seeded and parameterised.

Every workload is described by `WorkloadParams` (override any field with ``--wl key=value``):

- ``chat``      one class, short prompts and long answers (decode-heavy), priority interactive.
- ``summarize`` one class, long prompts and short answers (prefill-heavy), priority batch.
- ``mixed``     both classes at once; ``mix`` is the fraction of chat requests.
- ``bursty``    both classes with on/off phases: during the "on" part of each period
                (``burst_duty`` of ``burst_period_s``) the total rate is ``burst_factor`` times
                higher and the mix swings to ``burst_mix`` (mostly summarize); in the "off" part
                the rate is ``rate`` and the chat fraction is ``mix``.

Lengths are log-normal with the given mean and coefficient of variation (cv = 0: fixed), clipped to
[min, max]. Arrivals are Poisson (``arrival=poisson``), gamma with ``cv`` (burstier when cv > 1)
or evenly spaced (``constant``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from tandem.bench.traces import BenchRequest

WORKLOADS = ("chat", "summarize", "mixed", "bursty")


class WorkloadError(ValueError):
    pass


@dataclass
class WorkloadParams:
    rate: float = 4.0                 # requests/s (off-phase rate for bursty)
    arrival: str = "poisson"          # poisson | gamma | constant
    cv: float = 1.0                   # inter-arrival coefficient of variation for gamma
    mix: float = 0.7                  # fraction of chat requests (mixed, bursty off phase)
    # chat: short prompts, long answers
    chat_isl: float = 256
    chat_isl_cv: float = 0.5
    chat_osl: float = 384
    chat_osl_cv: float = 0.5
    chat_priority: str = "interactive"
    chat_prefix: int = 0              # tokens of a system prompt shared by every chat request
    # summarize: long prompts, short answers
    summarize_isl: float = 3072
    summarize_isl_cv: float = 0.4
    summarize_osl: float = 128
    summarize_osl_cv: float = 0.5
    summarize_priority: str = "batch"
    summarize_prefix: int = 0
    # clipping
    min_isl: int = 4
    max_isl: int = 32768
    min_osl: int = 1
    max_osl: int = 4096
    # bursty
    burst_period_s: float = 30.0
    burst_duty: float = 0.3
    burst_factor: float = 3.0
    burst_mix: float = 0.15

    def update(self, kv: dict[str, str]) -> "WorkloadParams":
        types = {f.name: f.type for f in fields(self)}
        for k, v in kv.items():
            k = k.replace("-", "_")
            if k not in types:
                raise WorkloadError(f"unknown workload parameter {k!r}; known: {', '.join(sorted(types))}")
            cur = getattr(self, k)
            try:
                setattr(self, k, type(cur)(float(v)) if isinstance(cur, (int, float)) and
                        not isinstance(cur, bool) else str(v))
            except ValueError:
                raise WorkloadError(f"workload parameter {k} expects a number, got {v!r}") from None
        self.validate()
        return self

    def validate(self) -> None:
        if self.rate <= 0:
            raise WorkloadError(f"rate must be > 0, got {self.rate}")
        if self.arrival not in ("poisson", "gamma", "constant"):
            raise WorkloadError(f"arrival must be poisson, gamma or constant, got {self.arrival!r}")
        if self.cv <= 0:
            raise WorkloadError(f"cv must be > 0, got {self.cv}")
        for name in ("mix", "burst_mix", "burst_duty"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise WorkloadError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.burst_period_s <= 0 or self.burst_factor <= 0:
            raise WorkloadError("burst_period_s and burst_factor must be > 0")
        for p in (self.chat_priority, self.summarize_priority):
            if p not in ("interactive", "standard", "batch"):
                raise WorkloadError(f"priority must be interactive, standard or batch, got {p!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_kv(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items or []:
        for part in it.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise WorkloadError(f"workload parameter {part!r} is not KEY=VALUE")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------------------- sampling

def _lognormal(rng: np.random.Generator, mean: float, cv: float, lo: int, hi: int) -> int:
    if cv <= 0:
        v = mean
    else:
        sigma2 = math.log1p(cv * cv)
        mu = math.log(max(mean, 1e-9)) - sigma2 / 2
        v = rng.lognormal(mu, math.sqrt(sigma2))
    return int(min(max(round(v), lo), hi))


def inter_arrival(rng: np.random.Generator, rate: float, arrival: str, cv: float) -> float:
    if arrival == "constant":
        return 1.0 / rate
    if arrival == "gamma":
        shape = 1.0 / (cv * cv)
        return float(rng.gamma(shape, 1.0 / (rate * shape)))
    return float(rng.exponential(1.0 / rate))


def arrivals(n_or_duration: tuple[int | None, float | None], rate: float, arrival: str = "poisson",
             cv: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival times of a stationary process: the first n, or all before duration."""
    n, duration = n_or_duration
    if n is None and duration is None:
        raise WorkloadError("give a duration or a number of requests")
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    while True:
        if (n is not None and len(out) >= n):
            break
        if duration is not None and t >= duration:
            break
        out.append(t)
        t += inter_arrival(rng, rate, arrival, cv)
    return out


def _phase(p: WorkloadParams, workload: str, t: float) -> tuple[float, float, float]:
    """(total rate, chat fraction, end of the current phase) at time t."""
    if workload == "chat":
        return p.rate, 1.0, math.inf
    if workload == "summarize":
        return p.rate, 0.0, math.inf
    if workload == "mixed":
        return p.rate, p.mix, math.inf
    period = p.burst_period_s
    k = math.floor(t / period)
    on_end = k * period + p.burst_duty * period
    if t < on_end:
        return p.rate * p.burst_factor, p.burst_mix, on_end
    off_end = (k + 1) * period
    if off_end <= t:             # float rounding at a boundary: we are in the next period
        on_end = off_end + p.burst_duty * period
        if t < on_end:
            return p.rate * p.burst_factor, p.burst_mix, on_end
        off_end += period
    return p.rate, p.mix, off_end


def generate(workload: str, params: WorkloadParams | None = None, *, duration_s: float | None = 60.0,
             max_requests: int | None = None, seed: int = 0) -> list[BenchRequest]:
    """Requests of a synthetic workload, deterministic for a given seed."""
    if workload not in WORKLOADS:
        raise WorkloadError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")
    p = params or WorkloadParams()
    p.validate()
    if duration_s is None and max_requests is None:
        duration_s = 60.0
    rng = np.random.default_rng(seed)
    out: list[BenchRequest] = []
    t = 0.0
    # shared system prompts: one block-id namespace per class, ids never reused by unique blocks
    while True:
        if max_requests is not None and len(out) >= max_requests:
            break
        if duration_s is not None and t >= duration_s:
            break
        rate, chat_frac, phase_end = _phase(p, workload, t)
        is_chat = rng.random() < chat_frac
        if is_chat:
            isl = _lognormal(rng, p.chat_isl, p.chat_isl_cv, p.min_isl, p.max_isl)
            osl = _lognormal(rng, p.chat_osl, p.chat_osl_cv, p.min_osl, p.max_osl)
            cls, prio, prefix = "chat", p.chat_priority, p.chat_prefix
        else:
            isl = _lognormal(rng, p.summarize_isl, p.summarize_isl_cv, p.min_isl, p.max_isl)
            osl = _lognormal(rng, p.summarize_osl, p.summarize_osl_cv, p.min_osl, p.max_osl)
            cls, prio, prefix = "summarize", p.summarize_priority, p.summarize_prefix
        out.append(BenchRequest(arrival_s=t, cls=cls, priority=prio, isl=max(isl, prefix + 1)
                                if prefix else isl, osl=osl,
                                hash_ids=_prefix_ids(cls, prefix), block_size=max(prefix, 1)))
        # next arrival; a phase boundary resamples at the new rate (exact for Poisson)
        while True:
            dt = inter_arrival(rng, rate, p.arrival, p.cv)
            if t + dt < phase_end:
                t += dt
                break
            t = phase_end
            rate, _, phase_end = _phase(p, workload, t)
            if p.arrival == "constant":
                break
    return out


def _prefix_ids(cls: str, prefix: int) -> list[int]:
    """A shared prefix is one block of `prefix` tokens with a fixed id per class.

    The prompt builder pads the rest of the prompt with tokens unique to the request.
    """
    if prefix <= 0:
        return []
    return [-1 if cls == "chat" else -2]
