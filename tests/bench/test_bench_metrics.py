"""Hand-computed examples of the metric definitions (vLLM bench serve) and of the report."""
import math

import pytest

from tandem.bench import RequestRecord, build_report
from tandem.bench.metrics import (cost_per_mtok_usd, dist, gpu_hours_from_timeline, itls, meets_slo,
                                  summarize, tpot, ttft)

MS = 1e3


def recs():
    a = RequestRecord(arrival_s=0.0, cls="chat", priority="interactive", isl=10, osl_requested=4,
                      output_tokens=4, ttft_s=0.1, token_times_s=[0.1, 0.15, 0.25, 0.30], e2e_s=0.32)
    b = RequestRecord(arrival_s=1.0, cls="sum", priority="batch", isl=100, osl_requested=1,
                      output_tokens=1, ttft_s=0.2, token_times_s=[0.2], e2e_s=0.2, dispatch_lag_s=0.01)
    c = RequestRecord(arrival_s=0.5, cls="chat", priority="interactive", isl=10, osl_requested=8,
                      e2e_s=0.05, status="error", error_kind="http_500")
    return [a, b, c]


def test_per_request_definitions():
    a, b, c = recs()
    assert ttft(a) == 0.1
    assert tpot(a) == pytest.approx((0.32 - 0.1) / 3)          # (E2E - TTFT) / (tokens - 1)
    assert itls(a) == pytest.approx([0.05, 0.10, 0.05])        # gaps between chunks
    assert tpot(b) is None and itls(b) == []                   # one token: no TPOT, no ITL
    assert ttft(c) is None
    # ttft falls back to the first chunk time when not set explicitly
    a.ttft_s = None
    assert ttft(a) == 0.1


def test_percentiles_linear_interpolation():
    d = dist([100.0, 200.0])
    assert d == {"mean": 150.0, "p50": 150.0, "p90": pytest.approx(190.0), "p99": pytest.approx(199.0)}
    d = dist([50.0, 100.0, 50.0])
    assert d["p50"] == 50.0 and d["p90"] == pytest.approx(90.0) and d["p99"] == pytest.approx(99.0)
    assert dist([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert dist([7.0])["p99"] == 7.0


def test_summary_block_by_hand():
    rs = recs()
    dur = 1.21                                  # last end: 1.0 + 0.01 lag + 0.2
    m = summarize(rs, dur, default_slo=(0.150, 0.080), gpu_hours=2 * dur / 3600, mean_gpus=2,
                  usd_per_gpu_hour=3.0)
    assert m["requests_completed"] == 2 and m["requests_failed"] == 1 and m["requests_total"] == 3
    assert m["request_throughput"] == pytest.approx(2 / 1.21)
    assert m["output_throughput"] == pytest.approx(5 / 1.21)
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(190.0)
    assert m["tpot_ms"]["p50"] == pytest.approx(220 / 3)
    assert m["itl_ms"]["mean"] == pytest.approx(200 / 3)
    assert m["itl_ms"]["p90"] == pytest.approx(90.0)
    assert m["e2e_ms"]["mean"] == pytest.approx(260.0)
    assert m["e2e_ms"]["p90"] == pytest.approx(308.0)
    assert m["e2e_ms"]["p99"] == pytest.approx(318.8)
    # SLO: a meets both (100 ms <= 150, 73.3 <= 80); b misses TTFT; c failed
    assert m["goodput"] == pytest.approx(1 / 1.21)
    assert m["goodput_per_gpu"] == pytest.approx(0.5 / 1.21)
    assert m["slo_attainment"] == pytest.approx(1 / 3)
    assert m["errors"] == {"http_500": 1}
    assert m["cost_per_mtok_usd"] == pytest.approx((2 * 1.21 / 3600) * 3.0 / (5 / 1e6))
    assert m["dispatch_lag_ms"]["p50"] == pytest.approx(0.0)
    assert m["prefix_cache_hit_rate"] is None                  # the server reported no cached tokens
    rs[0].cached_tokens, rs[0].prompt_tokens = 5, 10
    rs[1].cached_tokens = 50                                   # prompt_tokens unknown: isl (100) is used
    assert summarize(rs, dur)["prefix_cache_hit_rate"] == pytest.approx(55 / 110)
    # a tighter TPOT SLO drops a as well
    m2 = summarize(rs, dur, default_slo=(0.150, 0.070))
    assert m2["goodput"] == 0.0 and m2["slo_attainment"] == 0.0
    # one-token answers have no TPOT and meet the TPOT part of the SLO
    assert meets_slo(rs[1], None, 0.001)
    # no SLO at all: goodput is unknown, not "everything"
    assert summarize(rs, dur)["goodput"] is None


def test_empty_and_zero_traffic_are_not_nan():
    m = summarize([], 0.0)
    assert m["request_throughput"] is None and m["ttft_ms"]["p50"] is None
    rep = build_report({}, [], [])
    assert rep["summary"]["overall"]["requests_completed"] == 0
    assert rep["requests"] == []


def test_gpu_hours_from_timeline_step_function():
    tl = [{"t_s": 0.0, "num_gpus": 2}, {"t_s": 0.5, "num_gpus": 4}, {"t_s": 0.7}]  # no count: ignored
    assert gpu_hours_from_timeline(tl, 0.0, 1.21) == pytest.approx((2 * 0.5 + 4 * 0.71) / 3600)
    # before the first sample its value is assumed; samples after the end are ignored
    tl = [{"t_s": 0.5, "num_gpus": 4}, {"t_s": 5.0, "num_gpus": 100}]
    assert gpu_hours_from_timeline(tl, 0.0, 1.21) == pytest.approx(4 * 1.21 / 3600)
    assert gpu_hours_from_timeline([{"t_s": 1.0}], 0.0, 1.0) is None
    assert cost_per_mtok_usd(1.0, 2.0, 0) is None
    assert cost_per_mtok_usd(1.0, 2.0, 4_000_000) == pytest.approx(0.5)
    assert cost_per_mtok_usd(None, 2.0, 10) is None


def test_build_report_classes_slos_and_costs():
    cfg = {"slo_ttft_ms": 150, "slo_tpot_ms": 80, "slo_by_class": {"sum": {"ttft_ms": 500, "tpot_ms": None}},
           "gpus": 2, "gpu_hour_usd": 3.0}
    rep = build_report(cfg, recs(), [{"t_s": 0.0, "num_gpus": 9}])
    s = rep["summary"]
    assert list(s) == ["overall", "chat", "sum"]
    over = s["overall"]
    assert over["duration_s"] == pytest.approx(1.21)
    # the per-class SLO lets b (TTFT 200 ms <= 500) count as good now
    assert over["goodput"] == pytest.approx(2 / 1.21)
    assert s["sum"]["goodput"] == pytest.approx(1 / 1.21)
    assert s["chat"]["slo_attainment"] == pytest.approx(0.5)
    # explicit --gpus wins over the timeline; class GPU hours split by tokens (14 vs 101)
    assert over["gpu_hours"] == pytest.approx(2 * 1.21 / 3600)
    assert rep["config"]["gpu_hours_source"] == "gpus"
    assert s["chat"]["gpu_hours"] == pytest.approx(over["gpu_hours"] * 14 / 115)
    assert s["chat"]["gpu_hours"] + s["sum"]["gpu_hours"] == pytest.approx(over["gpu_hours"])
    assert s["sum"]["cost_per_mtok_usd"] == pytest.approx(s["sum"]["gpu_hours"] * 3.0 / 1e-6)
    # classes' durations are the run's, so their throughputs add up
    assert s["chat"]["request_throughput"] + s["sum"]["request_throughput"] == pytest.approx(
        over["request_throughput"])
    # without --gpus the timeline is integrated
    rep2 = build_report({"gpu_hour_usd": 3.0}, recs(), [{"t_s": 0.0, "num_gpus": 9}])
    assert rep2["summary"]["overall"]["gpu_hours"] == pytest.approx(9 * 1.21 / 3600)
    assert rep2["config"]["gpu_hours_source"] == "timeline"
    rep3 = build_report({"gpu_hour_usd": 3.0}, recs(), [])
    assert rep3["summary"]["overall"]["gpu_hours"] is None
    assert rep3["summary"]["overall"]["cost_per_mtok_usd"] is None


def test_build_report_is_pure_and_roundtrips(tmp_path):
    import json
    from tandem.bench import load_report, write_report
    rs = recs()
    rs[0].token_times_s = [0.1000004, 0.15, 0.25, 0.30]
    rep = build_report({"slo_ttft_ms": 150}, rs, [])
    assert rs[0].token_times_s[0] == 0.1000004                       # inputs untouched
    assert rep["requests"][0]["token_times_s"][0] == 0.1              # microsecond rounding
    p = tmp_path / "r.json"
    write_report(str(p), rep)
    back = load_report(str(p))
    assert back == json.loads(json.dumps(rep))
    # dict records (as a simulator or the JSON gives them) give the same summary
    again = build_report(back["config"], back["requests"], back["timeline"])
    assert again["summary"] == back["summary"]
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert not any(isinstance(v, float) and math.isnan(v) for v in back["summary"]["overall"].values())
