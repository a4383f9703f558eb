"""Synthetic workloads: deterministic under a seed, and shaped as documented."""
import numpy as np
import pytest

from tandem.bench import workloads as wl


def shape(reqs):
    return [(round(r.arrival_s, 9), r.cls, r.priority, r.isl, r.osl) for r in reqs]


@pytest.mark.parametrize("name", wl.WORKLOADS)
def test_deterministic_under_seed(name):
    a = wl.generate(name, wl.WorkloadParams(rate=20), duration_s=20, seed=3)
    b = wl.generate(name, wl.WorkloadParams(rate=20), duration_s=20, seed=3)
    c = wl.generate(name, wl.WorkloadParams(rate=20), duration_s=20, seed=4)
    assert shape(a) == shape(b) != shape(c)
    assert all(0 <= r.arrival_s < 20 for r in a)
    assert all(y.arrival_s >= x.arrival_s for x, y in zip(a, a[1:]))


def test_chat_and_summarize_shapes():
    chat = wl.generate("chat", wl.WorkloadParams(rate=50), duration_s=40, seed=0)
    summ = wl.generate("summarize", wl.WorkloadParams(rate=50), duration_s=40, seed=0)
    assert {(r.cls, r.priority) for r in chat} == {("chat", "interactive")}
    assert {(r.cls, r.priority) for r in summ} == {("summarize", "batch")}
    ci, co = np.mean([r.isl for r in chat]), np.mean([r.osl for r in chat])
    si, so = np.mean([r.isl for r in summ]), np.mean([r.osl for r in summ])
    assert ci < co and si > 10 * so                      # short-prompt/long-answer vs the reverse
    assert ci == pytest.approx(256, rel=0.1) and si == pytest.approx(3072, rel=0.1)
    assert len(chat) == pytest.approx(2000, rel=0.1)     # Poisson at 50/s for 40 s


def test_mixed_fraction_and_fixed_lengths():
    p = wl.WorkloadParams().update({"mix": "0.25", "rate": "100", "chat_isl": "32", "chat_isl_cv": "0",
                                    "summarize_osl": "7", "summarize_osl_cv": "0"})
    reqs = wl.generate("mixed", p, max_requests=4000, seed=1)
    assert len(reqs) == 4000
    frac = sum(r.cls == "chat" for r in reqs) / len(reqs)
    assert frac == pytest.approx(0.25, abs=0.03)
    assert {r.isl for r in reqs if r.cls == "chat"} == {32}
    assert {r.osl for r in reqs if r.cls == "summarize"} == {7}


def test_bursty_swings_rate_and_mix():
    p = wl.WorkloadParams(rate=20, burst_period_s=10, burst_duty=0.3, burst_factor=4, mix=0.9, burst_mix=0.1)
    reqs = wl.generate("bursty", p, duration_s=400, seed=2)
    on = [r for r in reqs if (r.arrival_s % 10) < 3]
    off = [r for r in reqs if (r.arrival_s % 10) >= 3]
    rate_on, rate_off = len(on) / (0.3 * 400), len(off) / (0.7 * 400)
    assert rate_on == pytest.approx(80, rel=0.1) and rate_off == pytest.approx(20, rel=0.1)
    assert sum(r.cls == "chat" for r in on) / len(on) == pytest.approx(0.1, abs=0.04)
    assert sum(r.cls == "chat" for r in off) / len(off) == pytest.approx(0.9, abs=0.04)


def test_arrival_processes():
    g = np.diff(wl.arrivals((20000, None), 10.0, "gamma", cv=3.0, seed=0))
    assert g.mean() == pytest.approx(0.1, rel=0.1)
    assert g.std() / g.mean() == pytest.approx(3.0, rel=0.15)
    e = np.diff(wl.arrivals((20000, None), 10.0, "poisson", seed=0))
    assert e.std() / e.mean() == pytest.approx(1.0, rel=0.05)
    c = np.diff(wl.arrivals((None, 1.0), 10.0, "constant"))
    assert np.allclose(c, 0.1)


def test_bad_parameters():
    with pytest.raises(wl.WorkloadError, match="unknown workload"):
        wl.generate("chatty")
    with pytest.raises(wl.WorkloadError, match="unknown workload parameter"):
        wl.WorkloadParams().update({"colour": "1"})
    with pytest.raises(wl.WorkloadError, match="expects a number"):
        wl.WorkloadParams().update({"rate": "fast"})
    with pytest.raises(wl.WorkloadError, match="mix"):
        wl.WorkloadParams().update({"mix": "1.5"})
    with pytest.raises(wl.WorkloadError, match="arrival"):
        wl.WorkloadParams().update({"arrival": "uniform"})
    assert wl.parse_kv(["a=1,b=2", "c=x"]) == {"a": "1", "b": "2", "c": "x"}
    with pytest.raises(wl.WorkloadError, match="KEY=VALUE"):
        wl.parse_kv(["oops"])
