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
