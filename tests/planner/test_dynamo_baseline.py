"""The Dynamo-like baseline: scales only every adjustment interval, never flips, skips at zero
traffic, loses in-flight work on scale-down only when told to (Dynamo #13559)."""
import json

import pytest

from tandem.planner import ClassStats, ClusterView, DynamoBaseline, DynamoConfig, PerfProfile, WorkerView
from tandem.planner.synthetic import synthetic_profile

PROF = PerfProfile.from_dict(synthetic_profile())


def view(t, ws, rate=20, isl=3000, osl=150):
    n = rate
    return ClusterView(now=t, workers=ws, window_s=1.0, classes={"c": ClassStats(
        arrivals=n, prompt_tokens=n * isl, completions=n, output_tokens=n * osl,
        ttft_mean_ms=300.0, tpot_mean_ms=30.0, ttft_p50_ms=250.0, tpot_p50_ms=28.0)})


def ws_(p, d):
    return [WorkerView(f"p{i}", "prefill") for i in range(p)] + \
           [WorkerView(f"d{i}", "decode") for i in range(d)]


def test_adjusts_only_every_interval_and_never_flips():
    b = DynamoBaseline(DynamoConfig(adjustment_interval_s=180, max_gpu_budget=16,
                                    slo_ttft_ms=1000, slo_itl_ms=50), PROF)
    ws = ws_(1, 1)
    times = []
    for t in range(0, 600):
        ds = b.tick(view(float(t), ws))
        assert all(d.action in ("start", "stop") for d in ds)
        if ds:
            times.append(t)
    assert times and all(t % 180 == 0 and t > 0 for t in times)
    assert b.flips == {"prefill->decode": 0, "decode->prefill": 0}


def test_replica_formula_and_budget():
    b = DynamoBaseline(DynamoConfig(adjustment_interval_s=10, max_gpu_budget=6,
                                    use_correction=False, slo_itl_ms=50), PROF)
    ws = ws_(1, 1)
    out = []
    for t in range(0, 11):
        out += b.tick(view(float(t), ws, rate=40, isl=3000, osl=150))
    li = b.last_inputs
    # 40 req/s x 3000 tokens = 120k tok/s of prefill at ~19k tok/s/GPU -> 7 > budget 6
    assert li["target_prefill"] + li["target_decode"] <= 6
    assert li["target_prefill"] >= 4
    starts = [d for d in out if d.action == "start"]
    assert len(starts) == li["target_prefill"] + li["target_decode"] - 2
    json.dumps(b.status(), allow_nan=False)


def test_zero_traffic_skips_adjustment():
    b = DynamoBaseline(DynamoConfig(adjustment_interval_s=5), PROF)
    ws = ws_(2, 2)
    for t in range(0, 30):
        assert b.tick(ClusterView(now=float(t), workers=ws, window_s=1.0)) == []
    assert "skipped" in b.last_inputs
    json.dumps(b.status(), allow_nan=False)


@pytest.mark.parametrize("lose", [True, False])
def test_scale_down_loses_inflight_only_when_flagged(lose):
    b = DynamoBaseline(DynamoConfig(adjustment_interval_s=5, lose_inflight_on_stop=lose,
                                    max_gpu_budget=16), PROF)
    ws = ws_(4, 6)
    ds = []
    for t in range(0, 6):
        ds += b.tick(view(float(t), ws, rate=1, isl=500, osl=50))
    stops = [d for d in ds if d.action == "stop"]
    assert stops and all(d.graceful is (not lose) for d in stops)
    assert len({d.worker_id for d in stops}) == len(stops)
