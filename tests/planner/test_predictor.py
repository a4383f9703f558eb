"""Short-horizon predictors: behaviour, zero traffic, bad inputs."""
import math

import pytest

from tandem.planner.predictor import (PREDICTORS, EWMA, Burst, Constant, Holt, MovingAverage,
                                      alpha_for, make_predictor)


@pytest.mark.parametrize("name", PREDICTORS)
def test_empty_and_zero_traffic_predict_zero(name):
    p = make_predictor(name)
    assert p.predict() == 0.0
    for _ in range(60):
        p.update(0.0)
    assert p.predict(5) == 0.0


@pytest.mark.parametrize("name", PREDICTORS)
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf, -3.0, "x"])
def test_bad_values_never_poison(name, bad):
    p = make_predictor(name)
    p.update(5.0)
    p.update(bad)
    v = p.predict(3)
    assert math.isfinite(v) and v >= 0
    p.update(5.0)
    assert math.isfinite(p.predict()) and p.predict() >= 0


def test_constant_is_last_value():
    p = Constant()
    for v in (1, 7, 3):
        p.update(v)
    assert p.predict() == 3


def test_ewma_converges_and_smooths():
    p = EWMA(alpha=0.5)
    p.update(0)
    p.update(10)
    assert p.predict() == pytest.approx(5.0)
    for _ in range(50):
        p.update(10)
    assert p.predict() == pytest.approx(10.0, rel=1e-6)


def test_alpha_half_life_independent_of_tick():
    # after half_life seconds of a step input, the EWMA is halfway, whatever the tick
    for tick in (0.25, 0.5, 1.0):
        p = make_predictor("ewma", tick_s=tick, half_life_s=4.0)
        p.update(0.0)
        for _ in range(int(4.0 / tick)):
            p.update(1.0)
        assert p.predict() == pytest.approx(0.5, abs=1e-9)
    assert 0 < alpha_for(1.0, 4.0) < 1


def test_holt_follows_a_ramp_better_than_ewma():
    h, e = Holt(alpha=0.5, beta=0.3, phi=0.95), EWMA(alpha=0.5)
    for t in range(30):
        h.update(t)
        e.update(t)
    assert abs(h.predict(1) - 30) < abs(e.predict(1) - 30)
    # damped trend never runs away and never goes below zero
    for _ in range(30):
        h.update(0)
    assert h.predict(100) >= 0


def test_burst_jumps_up_at_once_and_decays_slowly():
    b = Burst(alpha=0.2)
    for _ in range(20):
        b.update(1.0)
    b.update(50.0)
    assert b.predict() == 50.0
    b.update(1.0)
    assert 1.0 < b.predict() < 50.0


def test_moving_average_window():
    m = MovingAverage(3)
    for v in (3, 6, 9, 12):
        m.update(v)
    assert m.predict() == pytest.approx(9.0)


def test_unknown_predictor():
    with pytest.raises(ValueError):
        make_predictor("prophet")
