"""A re-implementation of NVIDIA Dynamo's SLA planner (throughput-based mode), as a study baseline.

What we followed (Dynamo's public docs and source; see docs/planner.md for the references):

* Every ``adjustment_interval`` seconds (default **180 s**, `SLAPlannerDefaults`), observe over the
  past interval: request count, average ISL and OSL, average TTFT and ITL, request duration.
* No traffic (the averages are NaN) -> **skip** the adjustment (planner_core: "Metrics contain None
  or NaN values (no active requests), skipping adjustment").
* Correction factors: ``p_corr = actual_ttft / expected_ttft(isl)`` (expected from the profile,
  a lone prefill), ``d_corr = actual_itl / expected_itl(concurrency per decode worker, isl+osl/2)``.
* Predict next ``num_req``, ``isl``, ``osl`` with a load predictor (Dynamo offers constant / ARIMA /
  Prophet / Kalman; we use ``constant`` or a moving average of the last N intervals).
* Prefill replicas = ``ceil(num_req * isl / interval * min(1, p_corr) / thpt_per_gpu(isl))`` where
  the profiled prefill throughput per GPU is ``isl / ttft(isl)`` of a lone request.
* Decode replicas = ``ceil(num_req * osl / interval / decode_thpt_per_gpu(itl / d_corr, isl+osl/2))``
  where the decode throughput is the best one whose ITL meets the corrected target
  (``find_best_throughput_per_gpu``: largest KV load with ITL <= target).
* ``max(.., min_endpoint)``; if p + d exceeds ``max_gpu_budget``, scale both by budget / total
  (prefill rounded, decode gets the rest).
* Apply by setting replica counts (Kubernetes): new workers start cold (``worker_start_s`` of the
  profile: pod start + weight load), removed workers are terminated. It **never flips a worker in
  place**. On scale-down, in-flight requests of the removed worker are **lost** (ai-dynamo/dynamo
  #13559) unless ``lose_inflight_on_stop=False``.

It implements the same ``tick(view) -> list[Decision]`` interface as `Planner`, so the simulator
and `PlannerLoop` drive either one.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Optional

from tandem.planner.capacity import PerfProfile, load_profile
from tandem.planner.types import ClusterView, Decision, WorkerView, finite, jsonable, nonneg, opt_nonneg


@dataclass
class DynamoConfig:
    adjustment_interval_s: float = 180.0
    slo_ttft_ms: float = 2000.0
    slo_itl_ms: float = 100.0
    max_gpu_budget: int = 8
    min_endpoint: int = 1
    predictor: str = "constant"           # constant | moving_average
    prediction_window: int = 50           # Dynamo's load_prediction_window_size
    lose_inflight_on_stop: bool = True    # Dynamo #13559: scale-down kills in-flight requests
    use_correction: bool = True
    prefill_engine_num_gpu: int = 1
    decode_engine_num_gpu: int = 1
    max_num_seqs: int = 256               # the engines' batch cap (bounds the profiled concurrency)
    history: int = 200

    def to_dict(self) -> dict:
        return asdict(self)


class _Pred:
    def __init__(self, kind: str, window: int) -> None:
        if kind not in ("constant", "moving_average"):
            raise ValueError(f"unknown baseline predictor {kind!r}")
        self.kind = kind
        self.data: deque[float] = deque(maxlen=max(1, window))

    def add(self, v: float) -> None:
        self.data.append(v)

    def next(self) -> float:
        if not self.data:
            return 0.0
        if self.kind == "constant":
            return self.data[-1]
        return sum(self.data) / len(self.data)


class DynamoBaseline:
    def __init__(self, config: Optional[DynamoConfig] = None, profile: Any = None) -> None:
        self.cfg = config or DynamoConfig()
        if self.cfg.adjustment_interval_s <= 0:
            raise ValueError("adjustment_interval_s must be > 0")
        if profile is None:
            raise ValueError("the baseline needs a perf profile")
        self.profile: PerfProfile = load_profile(profile)
        self._start: Optional[float] = None
        self._prev_now: Optional[float] = None
        self._last_adj: Optional[float] = None
        self._acc = self._zero_acc()
        self.num_req = _Pred(self.cfg.predictor, self.cfg.prediction_window)
        self.isl = _Pred(self.cfg.predictor, self.cfg.prediction_window)
        self.osl = _Pred(self.cfg.predictor, self.cfg.prediction_window)
        self.p_corr = 1.0
        self.d_corr = 1.0
        self.history: deque[Decision] = deque(maxlen=self.cfg.history)
        self.last_inputs: dict = {}
        self.adjustments = 0
        self.starts = 0
        self.stops = 0
        self._stopping: set[str] = set()
        self.flips = {"prefill->decode": 0, "decode->prefill": 0}   # always 0: it never flips

    @staticmethod
    def _zero_acc() -> dict:
        return {"arrivals": 0, "prompt": 0.0, "completions": 0, "output": 0.0,
                "ttft_sum": 0.0, "ttft_n": 0, "itl_sum": 0.0, "itl_n": 0}

    # ------------------------------------------------------------------------------ tick
    def tick(self, view: ClusterView) -> list[Decision]:
        now = finite(view.now, 0.0)
        if self._start is None:
            self._start = self._last_adj = now
        self._accumulate(view)
        if self._last_adj is not None and now - self._last_adj < self.cfg.adjustment_interval_s:
            return []
        self._last_adj = now
        acc, self._acc = self._acc, self._zero_acc()
        return self._adjust(now, view, acc)

    def _accumulate(self, view: ClusterView) -> None:
        # Windows of consecutive ticks are assumed not to overlap (window_s == tick); with a
        # longer window we scale counts by tick/window to avoid counting an event twice.
        a = self._acc
        now = finite(view.now, 0.0)
        win = finite(view.window_s, 0.0)
        f = 1.0
        if self._prev_now is not None and win > 0:
            f = min(1.0, max(0.0, now - self._prev_now) / win)
        self._prev_now = now
        for c in (view.classes or {}).values():
            arr = nonneg(c.arrivals) * f
            a["arrivals"] += arr
            a["prompt"] += nonneg(c.prompt_tokens) * f
            k = nonneg(c.completions) * f
            a["completions"] += k
            a["output"] += nonneg(c.output_tokens) * f
            ttft = opt_nonneg(c.ttft_mean_ms if c.ttft_mean_ms is not None else c.ttft_p50_ms)
            itl = opt_nonneg(c.tpot_mean_ms if c.tpot_mean_ms is not None else c.tpot_p50_ms)
            if ttft is not None and k + arr > 0:
                a["ttft_sum"] += ttft * (k if k > 0 else arr)
                a["ttft_n"] += k if k > 0 else arr
            if itl is not None and k > 0:
                a["itl_sum"] += itl * k
                a["itl_n"] += k

    def _counts(self, view: ClusterView) -> tuple[list[WorkerView], list[WorkerView]]:
        p, d = [], []
        for w in view.workers:
            if not w.in_service() or str(w.worker_id) in self._stopping:
                continue
            role = w.effective_role()
            (p if role == "prefill" else d if role == "decode" else []).append(w)
        live = {str(w.worker_id) for w in view.workers if w.state != "stopped"}
        self._stopping &= live
        return p, d

    def _adjust(self, now: float, view: ClusterView, acc: dict) -> list[Decision]:
        cfg, prof = self.cfg, self.profile
        interval = cfg.adjustment_interval_s
        pw, dw = self._counts(view)
        num_req = acc["arrivals"]
        isl = acc["prompt"] / num_req if num_req else math.nan
        osl = acc["output"] / acc["completions"] if acc["completions"] else math.nan
        ttft = acc["ttft_sum"] / acc["ttft_n"] / 1000 if acc["ttft_n"] else math.nan
        itl = acc["itl_sum"] / acc["itl_n"] / 1000 if acc["itl_n"] else math.nan
        inputs: dict = {"now": round(now, 3), "interval_s": interval, "num_req": round(num_req, 3),
                        "isl": isl, "osl": osl, "ttft_s": ttft, "itl_s": itl,
                        "prefill_workers": len(pw), "decode_workers": len(dw)}
        self.adjustments += 1
        if any(math.isnan(v) for v in (isl, osl, ttft, itl)):
            inputs["skipped"] = "no traffic (metrics are NaN)"
            self.last_inputs = jsonable(inputs)
            return []
        # observe -> predictors
        self.num_req.add(num_req)
        self.isl.add(isl)
        self.osl.add(osl)
        # correction factors
        if cfg.use_correction:
            exp_ttft = prof.prefill_time(isl)
            self.p_corr = ttft / exp_ttft if exp_ttft > 0 else 1.0
            duration = ttft + osl * itl
            conc = num_req / max(len(dw), 1) * duration / interval
            exp_itl = prof.decode_step_time(max(conc, 1.0), isl + osl / 2)
            self.d_corr = itl / exp_itl if exp_itl > 0 else 1.0
        n_req, n_isl, n_osl = self.num_req.next(), self.isl.next(), self.osl.next()
        # prefill replicas
        thpt_p = n_isl / prof.prefill_time(n_isl) if n_isl > 0 and prof.prefill_time(n_isl) > 0 else 1.0
        load_p = n_req * n_isl / interval * min(1.0, self.p_corr)
        next_p = math.ceil(load_p / thpt_p / cfg.prefill_engine_num_gpu - 1e-9)
        # decode replicas
        corrected_itl = cfg.slo_itl_ms / 1000 / self.d_corr if self.d_corr > 0 else cfg.slo_itl_ms / 1000
        b, step, _ = prof.max_decode_batch(n_isl + n_osl / 2, corrected_itl, kv_frac=1.0,
                                           max_batch=cfg.max_num_seqs)
        thpt_d = b / step if step > 0 else 1.0
        next_d = math.ceil(n_req * n_osl / interval / thpt_d / cfg.decode_engine_num_gpu - 1e-9)
        next_p = max(next_p, cfg.min_endpoint)
        next_d = max(next_d, cfg.min_endpoint)
        total = next_p * cfg.prefill_engine_num_gpu + next_d * cfg.decode_engine_num_gpu
        if total > cfg.max_gpu_budget:
            scale = cfg.max_gpu_budget / total
            next_p = max(cfg.min_endpoint, round(next_p * scale))
            next_d = max(cfg.min_endpoint, round((cfg.max_gpu_budget - next_p * cfg.prefill_engine_num_gpu)
                                                 / cfg.decode_engine_num_gpu))
        inputs.update({"p_correction": self.p_corr, "d_correction": self.d_corr,
                       "pred_num_req": n_req, "pred_isl": n_isl, "pred_osl": n_osl,
                       "prefill_thpt_per_gpu": thpt_p, "decode_thpt_per_gpu": thpt_d,
                       "target_prefill": next_p, "target_decode": next_d})
        self.last_inputs = jsonable(inputs)
        out: list[Decision] = []
        out += self._scale_to(now, "prefill", pw, next_p, inputs)
        out += self._scale_to(now, "decode", dw, next_d, inputs)
        for d in out:
            self.history.append(d)
        return out

    def _scale_to(self, now: float, role: str, ws: list[WorkerView], target: int,
                  inputs: dict) -> list[Decision]:
        cur = len(ws)
        out: list[Decision] = []
        why = f"adjustment interval: {role} replicas {cur} -> {target}"
        din = jsonable(inputs)
        if target > cur:
            for _ in range(target - cur):
                self.starts += 1
                out.append(Decision(time=now, action="start", to_role=role, reason=why, inputs=din))
        elif target < cur:
            # Kubernetes removes the newest pods first
            victims = sorted(ws, key=lambda w: (finite(w.since, 0.0), str(w.worker_id)),
                             reverse=True)[:cur - target]
            for w in victims:
                self.stops += 1
                self._stopping.add(str(w.worker_id))
                out.append(Decision(time=now, action="stop", worker_id=w.worker_id, from_role=role,
                                    reason=why + (" (in-flight requests lost)"
                                                  if self.cfg.lose_inflight_on_stop else ""),
                                    inputs=din, graceful=not self.cfg.lose_inflight_on_stop))
        return out

    # ------------------------------------------------------------------------- reporting
    def status(self) -> dict:
        return jsonable({"policy": "dynamo-sla-baseline", "config": self.cfg.to_dict(),
                         "adjustments": self.adjustments, "starts": self.starts,
                         "stops": self.stops, "last_inputs": self.last_inputs,
                         "decisions": [d.to_dict() for d in self.history]})

    def metrics(self) -> dict[str, float]:
        return {"starts_total": float(self.starts), "stops_total": float(self.stops),
                "adjustments_total": float(self.adjustments)}
