"""Seasonal predictor (issue #8): period detection, forecast ahead of a recurring edge, and
exactly the default (burst) behaviour when no period is found. Synthetic profile/series."""
import math
import random

import pytest

from tandem.planner import ClassStats, ClusterView, Planner, PlannerConfig, PerfProfile, WorkerView
from tandem.planner.predictor import Burst, Seasonal, alpha_for, detect_period, make_predictor
from tandem.planner.synthetic import synthetic_profile


def square(t, period=240, hi=3000.0, lo=1000.0):
    return hi if (t % period) < period / 2 else lo


def test_finds_the_period_and_forecasts_the_edge():
    rng = random.Random(1)
    p = make_predictor("seasonal", tick_s=1.0)
    for t in range(460):
        p.update(square(t) + rng.gauss(0, 200))
    assert p.period is not None and abs(p.period - 240) <= 3 and p.confidence > 0.8
    # t=459 is low (1000); the edge at 480 is within 22 ticks, not within 1
    assert p.predict(22) > 2500
    assert p.predict(1) < 1600


@pytest.mark.parametrize("kind", ["noise", "ramp", "constant", "step", "short"])
def test_no_period_is_exactly_burst(kind):
    rng = random.Random(2)
    n = 150 if kind == "short" else 900
    xs = {"noise": lambda t: 2000 + rng.gauss(0, 300),
          "ramp": lambda t: 10.0 * t + rng.gauss(0, 50),
          "constant": lambda t: 1234.0,
          "step": lambda t: 500.0 if t < 400 else 3000.0,
          "short": lambda t: square(t, period=120)}[kind]
    s, b = make_predictor("seasonal", tick_s=1.0), Burst(alpha_for(1.0, 4.0))
    for t in range(n):
        x = xs(t)
        s.update(x)
        b.update(x)
        assert s.period is None
        for h in (1.0, 22.0):
            assert s.predict(h) == b.predict(h)


def test_detect_period_bounds_and_validation():
    assert detect_period([1.0] * 50, 10, 40, 0.6, 1.8) == (None, 0.0)
    assert detect_period([1.0, 2.0], 10, 40, 0.6, 1.8) == (None, 0.0)
    with pytest.raises(ValueError):
        Seasonal(Burst(), min_lag=1)
    with pytest.raises(ValueError):
        Seasonal(Burst(), threshold=1.5)
    s = Seasonal(Burst(), min_lag=2, max_lag=20)
    assert s.values.maxlen == 37                       # history is bounded
    for v in (None, math.nan, -3, math.inf):
        s.update(v)
    assert s.predict(5) == 0.0


SUMM = ClassStats(arrivals=8, prompt_tokens=8 * 3000, completions=8, output_tokens=8 * 100)
CHAT = ClassStats(arrivals=8, prompt_tokens=8 * 200, completions=8, output_tokens=8 * 800)


def drive(predictor, phases, ticks, prof):
    """Planner with scaling on hand-built views: starts become active after worker_start_s,
    stops leave; flips are not applied (only scaling is under test). Returns the decisions."""
    pl = Planner(PlannerConfig(slo_ttft_ms=1000, slo_tpot_ms=50, min_gpus=2, max_gpus=24,
                               scale_in_delay_s=30, start_cooldown_s=5, predictor=predictor,
                               flap_suppress=0), prof)   # flips are not applied here
    ws = [WorkerView("p0", "prefill", since=0), WorkerView("d0", "decode", since=0)]
    out, n = [], 0
    for t in range(ticks):
        for w in ws:
            if w.state == "starting" and t >= w.since + prof.worker_start_s:
                w.state = "active"
        ds = pl.tick(ClusterView(now=float(t), workers=list(ws), window_s=1.0,
                                 classes={"c": phases(t)}))
        for d in ds:
            if d.action == "start":
                n += 1
                ws.append(WorkerView(f"s{n}", d.to_role, state="starting", since=float(t)))
            elif d.action == "stop":
                ws = [w for w in ws if w.worker_id != d.worker_id]
        out += [(t, d) for d in ds]
    return pl, out


@pytest.fixture(scope="module")
def prof():
    return PerfProfile.from_dict(synthetic_profile())


def test_planner_starts_prefill_before_a_recurring_edge(prof):
    """Summarization (prefill-heavy) for 120 s, chat for 120 s, repeated: once the period is
    found, the seasonal planner starts prefill workers within a cold start before the
    chat -> summarization edge at 480 s; the default planner only after it."""
    phases = lambda t: SUMM if (t % 240) < 120 else CHAT  # noqa: E731
    res, ready = {}, {}
    for name in ("burst", "seasonal"):
        pl, ds = drive(name, phases, 482, prof)
        res[name] = [t for t, d in ds if d.action == "start" and d.to_role == "prefill"
                     and 480 - prof.worker_start_s - 30 <= t < 480]
        ready[name] = pl.last_inputs["split"]["prefill"]    # serving at the edge (not starting)
        if name == "seasonal":
            assert pl.pred["prefill_tps"].period is not None
            assert "ahead" in pl.last_inputs
    assert res["seasonal"] and not res["burst"]
    assert ready["seasonal"] > ready["burst"]


def test_planner_without_a_period_decides_exactly_like_burst(prof):
    rng = random.Random(3)
    seq = [SUMM if rng.random() < 0.5 else CHAT for _ in range(300)]
    dec = {}
    for name in ("burst", "seasonal"):
        pl, ds = drive(name, lambda t: seq[t], 300, prof)
        if name == "seasonal":
            assert all(p.period is None for p in pl.pred.values())
        dec[name] = [(t, d.action, d.to_role, d.from_role, d.worker_id, d.reason) for t, d in ds]
    assert dec["burst"] == dec["seasonal"] and dec["burst"]
