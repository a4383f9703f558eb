"""benchmarks/sim_steps.py: steps rebuilt from receive times, long-step runs by admissions, long gaps."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("benchmarks_sim_steps", os.path.join(ROOT, "benchmarks", "sim_steps.py"))
sim_steps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim_steps)


def _req(idx, sent, times):
    return {"idx": idx, "arrival_s": sent, "dispatch_lag_s": 0.0, "status": "ok", "ttft_s": times[0] - sent,
            "token_times_s": [t - sent for t in times], "output_tokens": len(times)}


def _report(shift=0.0):
    # steps end at 10, 12, 30 (admits request 1: 18 ms), 45 (a chunk step after a long one: 15 ms), 47 ms
    return {"requests": [_req(0, 0.0, [0.010, 0.012, 0.030, 0.045, 0.047]),
                         _req(1, 0.011 - shift, [0.0301, 0.0451, 0.0471])]}


def test_long_steps_and_gaps():
    rep = _report()
    assert sim_steps.long_step_runs(rep) == {0: [pytest.approx(0.015)]}    # only the step after a long one
    assert sim_steps.long_itls(rep) == [pytest.approx(0.015), pytest.approx(0.015), pytest.approx(0.018)]
    d = sim_steps.ttft_diffs(rep, _report(shift=0.002))                   # sim's request 1 waited 2 ms more
    assert d == [pytest.approx(-0.002), pytest.approx(0.0)]
    text = sim_steps.compare(rep, rep)
    assert "0: 15.0 (1)" in text and "3, 16.0" in text and "median 0.0" in text


def test_windows_and_ratios_of_two_runs():
    rep = _report()
    w = sim_steps.step_windows(rep, 0.02)                   # long steps end at 30 ms (18 ms) and 45 ms (15 ms)
    assert w == {1: [pytest.approx(0.018)], 2: [pytest.approx(0.015)]}
    slow = _report()
    r1 = slow["requests"][1]
    r1["ttft_s"] *= 2                                        # request 1's first token twice as late
    r0 = slow["requests"][0]
    r0["e2e_s"] = r0["token_times_s"][-1] * 3               # request 0 decodes 3x slower end to end
    rep["requests"][0]["e2e_s"] = rep["requests"][0]["token_times_s"][-1]
    assert sim_steps.latency_ratios(rep, slow, "ttft") == [pytest.approx(1.0), pytest.approx(2.0)]
    tpot = sim_steps.latency_ratios(rep, slow, "tpot")      # only request 0 has an e2e
    assert len(tpot) == 1 and tpot[0] == pytest.approx((0.141 - 0.010) / (0.047 - 0.010))
    text = sim_steps.compare_windows(rep, slow, 0.02, names=("run3", "run4"))
    assert "run3 / run4" in text and "TTFT run4 / run3 per request: p10 1.10, median 1.50" in text
