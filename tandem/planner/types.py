"""Typed inputs and outputs of the planner. Pure data, JSON-able, torch-free.

The planner never reads a clock: everything it needs about "now" is in `ClusterView.now`, so the
same class runs in virtual time (the simulator) and in real time (the server's asyncio loop).

* `WorkerView`   one worker (one GPU or one tensor-parallel group) as the planner sees it.
* `ClassStats`   what happened to one request class (priority class or workload class) in the
                 last metrics window: arrivals and their prompt lengths, completions and their
                 output lengths, TTFT/TPOT percentiles.
* `ClusterView`  a snapshot: the time, the workers, the per-class window stats, prefill queue wait.
* `Decision`     one action the planner asks the connector to take, with its reason and inputs.
* `PlannerConfig` every knob, with defaults that suit a 1 s tick.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union

Role = Literal["prefill", "decode", "both"]
WorkerState = Literal["active", "draining", "flipping", "starting", "stopped"]
Action = Literal["flip", "start", "stop", "hold"]
WorkerId = Union[int, str]

ROLES = ("prefill", "decode", "both")
STATES = ("active", "draining", "flipping", "starting", "stopped")
ACTIONS = ("flip", "start", "stop", "hold")


def finite(x: Any, default: float = 0.0) -> float:
    """`x` as a finite float, else `default` (None, NaN, inf, strings all become `default`)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


BIG = 1e15      # no metric of a real cluster comes near this; larger values are clamped


def nonneg(x: Any, default: float = 0.0) -> float:
    """`x` as a finite float in [0, BIG], else `default`."""
    v = finite(x, default)
    return min(v, BIG) if v >= 0.0 else default


def opt_nonneg(x: Any) -> Optional[float]:
    """A finite non-negative float, or None when `x` is missing or not a usable number."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return min(v, BIG) if math.isfinite(v) and v >= 0.0 else None


@dataclass
class WorkerView:
    worker_id: WorkerId
    role: str = "decode"                     # prefill | decode | both
    state: str = "active"                    # active | draining | flipping | starting | stopped
    since: float = 0.0                       # time of the last role change (or start)
    waiting_prefill_tokens: float = 0.0      # prompt tokens queued, not yet prefilled
    num_waiting: int = 0                     # requests queued (not yet running)
    num_running: int = 0                     # requests running (decoding, or prefilling)
    kv_usage: float = 0.0                    # fraction 0..1 of the KV cache in use
    kv_capacity_tokens: int = 0              # KV cache size in tokens (0: take the profile's)
    step_time_s: float = 0.0                 # mean engine step time in the last window
    prefill_tokens_per_s: float = 0.0        # prompt tokens prefilled per second (last window)
    decode_tokens_per_s: float = 0.0         # tokens generated per second (last window)
    target_role: Optional[str] = None        # while state == "flipping": the role it flips to
    gpus: int = 1                            # GPUs this worker holds (tensor parallel size)

    def effective_role(self) -> str:
        """The role this worker counts toward: the target of an in-flight flip, else its role."""
        if self.state == "flipping" and self.target_role in ("prefill", "decode", "both"):
            return str(self.target_role)
        return self.role

    def in_service(self) -> bool:
        """Counts toward its pool's capacity now or very soon (not draining out, not stopped)."""
        return self.state in ("active", "flipping", "starting")

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerView":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ClassStats:
    """One request class over the last window (counts are totals over the window)."""
    arrivals: int = 0                        # requests that arrived in the window
    prompt_tokens: float = 0.0               # sum of their prompt lengths
    uncached_prompt_tokens: Optional[float] = None   # sum of prompt tokens not hit in any prefix cache
    isl_p90: Optional[float] = None
    completions: int = 0                     # requests that finished in the window
    output_tokens: float = 0.0               # sum of the output lengths of those completions
    osl_p90: Optional[float] = None
    generated_tokens: float = 0.0            # tokens generated in the window (all requests)
    ttft_p50_ms: Optional[float] = None
    ttft_p90_ms: Optional[float] = None
    tpot_p50_ms: Optional[float] = None
    tpot_p90_ms: Optional[float] = None
    ttft_mean_ms: Optional[float] = None
    tpot_mean_ms: Optional[float] = None
    slo_events: int = 0                      # first tokens + finishes judged against the SLOs (0: no SLO given)
    slo_misses: int = 0                      # of those, over their SLO

    @property
    def isl_mean(self) -> float:
        return nonneg(self.prompt_tokens) / self.arrivals if self.arrivals > 0 else 0.0

    @property
    def osl_mean(self) -> float:
        return nonneg(self.output_tokens) / self.completions if self.completions > 0 else 0.0

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ClassStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ClusterView:
    now: float
    workers: list[WorkerView] = field(default_factory=list)
    window_s: float = 1.0                    # length of the window the class stats cover
    classes: dict[str, ClassStats] = field(default_factory=dict)
    prefill_queue_wait_mean_s: Optional[float] = None   # time from arrival to prefill start
    prefill_queue_wait_p90_s: Optional[float] = None

    # ------------------------------------------------------------------ aggregates (NaN-free)
    def total(self, attr: str) -> float:
        return sum(nonneg(getattr(c, attr)) for c in self.classes.values())

    @property
    def arrivals(self) -> int:
        return int(sum(max(int(nonneg(c.arrivals)), 0) for c in self.classes.values()))

    @property
    def completions(self) -> int:
        return int(sum(max(int(nonneg(c.completions)), 0) for c in self.classes.values()))

    def to_dict(self) -> dict:
        return _jsonable({
            "now": self.now, "window_s": self.window_s,
            "workers": [w.to_dict() for w in self.workers],
            "classes": {k: c.to_dict() for k, c in self.classes.items()},
            "prefill_queue_wait_mean_s": self.prefill_queue_wait_mean_s,
            "prefill_queue_wait_p90_s": self.prefill_queue_wait_p90_s,
        })

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterView":
        return cls(now=finite(d.get("now")), window_s=finite(d.get("window_s"), 1.0),
                   workers=[WorkerView.from_dict(w) for w in d.get("workers", [])],
                   classes={k: ClassStats.from_dict(c) for k, c in d.get("classes", {}).items()},
                   prefill_queue_wait_mean_s=d.get("prefill_queue_wait_mean_s"),
                   prefill_queue_wait_p90_s=d.get("prefill_queue_wait_p90_s"))


@dataclass
class Decision:
    time: float
    action: str                              # flip | start | stop | hold
    worker_id: Optional[WorkerId] = None     # None for start (the connector names the new worker)
    from_role: Optional[str] = None
    to_role: Optional[str] = None
    reason: str = ""
    inputs: dict = field(default_factory=dict)
    graceful: bool = True                    # stop: drain in-flight work first (False loses it)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def __str__(self) -> str:
        who = "" if self.worker_id is None else f" worker {self.worker_id}"
        roles = f" {self.from_role or '-'}->{self.to_role or '-'}" if self.action == "flip" else (
            f" {self.to_role}" if self.action == "start" else "")
        return f"[t={self.time:.2f}] {self.action}{who}{roles}: {self.reason}"


# What a deployment that spills (`--spill-batch`: queued batch prompts are prefilled on decode
# workers) changes in the planner, under anything the user sets (`tandem serve` and `tandem sim`
# apply it). The decode pool carries a chat -> summarization edge by spilling, so a decode ->
# prefill flip waits 30 s (it would migrate the running chats onto fewer decode workers and take
# the step budget spill uses), and the hedge is off (the prefill slack it keeps through a chat
# phase crowds the chats onto fewer decode workers). 64 GPUs, `bursty-swing` with spill, x1.55 /
# x1.6 / x1.8 / x2.0: 98.2 / 98.4 / 96.3 / 95.7 % against 100 / 98.9 / 88.0 / did not finish
# without these; the best static splits 100 / 99.99 / 95.4 / 91.1 % (docs/planner.md, session 10)
SPILL_PLANNER = {"spill_flip_delay_s": 30.0, "hedge_window_s": 0.0}


@dataclass
class PlannerConfig:
    tick_s: float = 1.0                      # planner cadence (min 0.25 s)
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 100.0
    slo_classes: Optional[list[str]] = None  # classes whose measured TTFT/TPOT feed back (None: all)
    # planning targets, as fractions of the SLO / of capacity
    ttft_target_frac: float = 0.8            # plan for p90 TTFT <= this x SLO
    tpot_target_frac: float = 0.85           # plan decode batches whose step time <= this x SLO
    prefill_util_max: float = 0.85           # never plan a prefill pool above this utilisation
    decode_util_max: float = 0.9             # never plan a decode pool above this utilisation
    kv_util_max: float = 0.9                 # plan decode batches within this fraction of KV
    max_num_seqs: int = 256                  # the engines' cap on running sequences (decode batch)
    backlog_drain_s: float = 4.0             # queued prefill tokens must clear within this time
    # anti-flapping
    min_dwell_s: float = 5.0                 # a worker keeps a role at least this long
    cooldown_s: float = 2.0                  # min time between two batches of flips
    reverse_cooldown_s: float = 6.0          # min time before flipping in the opposite direction
    hysteresis: float = 0.15                 # donor keeps (1+h) x its need; balance gain must be h
    peak_window_s: float = 10.0              # plan for the largest need of this recent past (0: off)
    donor_memory_s: float = 30.0             # a donor keeps room for its recent load, decaying (0: off)
    # a balance move within budget spreads the slack by the pools' peak loads of this recent past,
    # not by their loads now: the pool that carried the last phase keeps room for its return (0: off)
    hedge_window_s: float = 300.0
    # flap damping: each reversal of flip direction within flap_hold_s of the last flip adds 1
    # to a penalty that halves every flap_half_life_s; from flap_suppress until it decays to
    # flap_reuse the planner plans for the peaks of the last flap_hold_s (the cycle), not for
    # what is needed now (0: off)
    flap_suppress: float = 2.0
    flap_reuse: float = 0.5
    flap_half_life_s: float = 120.0
    flap_hold_s: float = 60.0
    flap_trial_margin: float = 0.05          # damping that misses this much more of the SLO is lifted (0: never)
    flap_trial_min_s: float = 10.0           # the trial judges damping after this long (at most flap_hold_s / 2)
    high_watermark: float = 0.8              # balance moves only when the bottleneck is above this
    max_flips_per_tick: int = 0              # 0: auto = max(1, round(flip_frac_per_tick x GPUs))
    flip_frac_per_tick: float = 0.15         # 64 GPUs: 9 a tick (0.05 took ~11 s to carry a swing edge)
    # a measured-SLO feedback tick flips one worker per this many GPUs of the budget, at least one
    # (0: always one). One flip every 2 s is 1.6 % of 64 GPUs but 0.2 % of 512: there a swing's
    # edge waited on it (bursty-swing x1.55 at 512 GPUs: 92.3 % with one, 94.3 % with G // 64)
    feedback_gpus: int = 64
    min_prefill: int = 1                     # 0: the prefill pool may empty (decode workers prefill)
    min_decode: int = 1
    # an empty prefill pool (min_prefill 0) is planned only when the decode workers can absorb the
    # prefill work: it takes at most this fraction of their time and the p90 prompt's prefill,
    # mixed into a decode step, keeps that step within the TPOT target
    aggregate_prefill_frac: float = 0.2
    # with spill (the router prefills queued batch prompts on decode workers, `--spill-batch`), a
    # decode -> prefill flip waits until the prefill pool has been short this long: the decode
    # workers' spare step budget carries the edge at once, and flipping them then migrates their
    # running chats onto fewer decode workers and takes that budget away (0: flip at once)
    spill_flip_delay_s: float = 0.0
    # zero traffic
    idle_split: Optional[float] = None       # fraction of the budget as prefill when idle (None: keep)
    idle_after_s: float = 30.0
    # scaling of the total (both None: fixed budget, flips only)
    min_gpus: Optional[int] = None
    max_gpus: Optional[int] = None
    scale_headroom: float = 0.1              # keep this fraction above the computed need
    # demand must stay low this long before a stop: ~3x a measured cold start (20 s for 8B on H100),
    # so a stopped GPU is not restarted before the stop paid off (30 s churned on the Azure code
    # trace in the planner study: SLO attainment 86.9 % vs 95.1 % at 60 s, docs/planner.md)
    scale_in_delay_s: float = 60.0
    start_cooldown_s: float = 5.0
    # prediction
    # constant | ewma | holt | burst (max(ewma, last)) | seasonal (burst + a detected period:
    # scale-out starts a cold start ahead of a recurring edge; see docs/planner.md, issue #8)
    predictor: str = "burst"
    predictor_half_life_s: float = 4.0
    history: int = 200                       # decisions kept for /v1/cluster

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not finite(self.tick_s, -1) >= 0.25:
            raise ValueError(f"tick_s must be >= 0.25 s, got {self.tick_s}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            if not finite(getattr(self, name), -1) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ttft_target_frac", "tpot_target_frac", "prefill_util_max", "decode_util_max",
                     "kv_util_max", "high_watermark", "aggregate_prefill_frac"):
            v = finite(getattr(self, name), -1)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not isinstance(self.feedback_gpus, int) or self.feedback_gpus < 0:
            raise ValueError(f"feedback_gpus must be an int >= 0, got {self.feedback_gpus!r}")
        for name in ("min_dwell_s", "cooldown_s", "reverse_cooldown_s", "hysteresis",
                     "idle_after_s", "scale_headroom", "scale_in_delay_s", "start_cooldown_s",
                     "backlog_drain_s", "flip_frac_per_tick", "peak_window_s", "donor_memory_s",
                     "hedge_window_s", "spill_flip_delay_s",
                     "flap_suppress", "flap_reuse", "flap_half_life_s", "flap_hold_s", "flap_trial_margin",
                     "flap_trial_min_s"):
            if not finite(getattr(self, name), -1) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not finite(self.predictor_half_life_s, -1) > 0:
            raise ValueError("predictor_half_life_s must be > 0")
        if self.idle_split is not None and not 0 <= finite(self.idle_split, -1) <= 1:
            raise ValueError(f"idle_split must be in [0, 1], got {self.idle_split}")
        if self.min_prefill < 0 or self.min_decode < 0 or self.max_flips_per_tick < 0:
            raise ValueError("min_prefill, min_decode and max_flips_per_tick must be >= 0")
        if self.min_gpus is not None and self.min_gpus < max(self.min_prefill + self.min_decode, 1):
            raise ValueError("min_gpus must be >= min_prefill + min_decode")
        if self.max_gpus is not None and self.min_gpus is not None and self.max_gpus < self.min_gpus:
            raise ValueError("max_gpus must be >= min_gpus")

    @property
    def scaling(self) -> bool:
        return self.min_gpus is not None or self.max_gpus is not None

    @property
    def ttft_target_s(self) -> float:
        """The TTFT the planner sizes for: the SLO less its margin (`ttft_target_frac`)."""
        return self.slo_ttft_ms / 1000 * self.ttft_target_frac

    @property
    def tpot_target_s(self) -> float:
        """The TPOT the planner sizes for: the SLO less its margin (`tpot_target_frac`)."""
        return self.slo_tpot_ms / 1000 * self.tpot_target_frac

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "PlannerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _jsonable(x: Any) -> Any:
    """Copy of `x` that json.dumps accepts with allow_nan=False (NaN/inf become None)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    try:
        import numpy as np  # numpy scalars from callers
        if isinstance(x, np.generic):
            return _jsonable(x.item())
    except ImportError:  # pragma: no cover
        pass
    return str(x)


jsonable = _jsonable
