"""Short-horizon load predictors: `update(value)` once per tick, `predict(horizon_ticks)`.

All are safe at zero traffic: values that are None, NaN, inf or negative are treated as 0 (a
rate cannot be negative), outputs are always finite and >= 0, and a predictor that has seen
nothing predicts 0.

* `Constant`  next = last observed value (Dynamo's "constant" predictor).
* `EWMA`      exponentially weighted moving average; `alpha` per update.
* `Holt`      double exponential smoothing (level + trend), trend damped, clamped at 0.
* `Burst`     max(EWMA, last): jumps up with a burst at once, decays like the EWMA afterwards.
* `MovingAverage`  mean of the last `window` values (the baseline's choice).

`make_predictor(name, tick_s, half_life_s)` builds one by name with an alpha that gives the same
half-life in seconds whatever the tick.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional, Protocol


def _clean(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) and x > 0.0 else 0.0


def _out(x: float) -> float:
    return x if math.isfinite(x) and x > 0.0 else 0.0


class Predictor(Protocol):
    def update(self, value: float) -> None: ...
    def predict(self, horizon: float = 1.0) -> float: ...


class Constant:
    name = "constant"

    def __init__(self) -> None:
        self.last: Optional[float] = None

    def update(self, value: float) -> None:
        self.last = _clean(value)

    def predict(self, horizon: float = 1.0) -> float:
        return _out(self.last or 0.0)


class EWMA:
    name = "ewma"

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.level: Optional[float] = None

    def update(self, value: float) -> None:
        x = _clean(value)
        self.level = x if self.level is None else self.level + self.alpha * (x - self.level)

    def predict(self, horizon: float = 1.0) -> float:
        return _out(self.level or 0.0)


class Holt:
    """Holt's linear trend method with a damped trend (phi) so that bursts do not run away."""
    name = "holt"

    def __init__(self, alpha: float = 0.4, beta: float = 0.2, phi: float = 0.8) -> None:
        for n, v in (("alpha", alpha), ("beta", beta), ("phi", phi)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{n} must be in (0, 1], got {v}")
        self.alpha, self.beta, self.phi = alpha, beta, phi
        self.level: Optional[float] = None
        self.trend = 0.0

    def update(self, value: float) -> None:
        x = _clean(value)
        if self.level is None:
            self.level, self.trend = x, 0.0
            return
        prev = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (prev + self.phi * self.trend)
        self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.phi * self.trend
        if not (math.isfinite(self.level) and math.isfinite(self.trend)):  # pragma: no cover
            self.level, self.trend = x, 0.0

    def predict(self, horizon: float = 1.0) -> float:
        if self.level is None:
            return 0.0
        h = max(0.0, _clean(horizon))
        # damped trend: sum_{i=1..h} phi^i
        if self.phi >= 1.0:
            damp = h
        else:
            damp = self.phi * (1 - self.phi ** h) / (1 - self.phi)
        return _out(self.level + damp * self.trend)


class Burst:
    """max(EWMA, last value): reacts to a burst within one tick, forgets it at the EWMA's pace."""
    name = "burst"

    def __init__(self, alpha: float = 0.3) -> None:
        self.ewma = EWMA(alpha)
        self.last = 0.0

    def update(self, value: float) -> None:
        self.last = _clean(value)
        self.ewma.update(self.last)

    def predict(self, horizon: float = 1.0) -> float:
        return _out(max(self.ewma.predict(horizon), self.last))


class MovingAverage:
    name = "moving_average"

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.values: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> None:
        self.values.append(_clean(value))

    def predict(self, horizon: float = 1.0) -> float:
        return _out(sum(self.values) / len(self.values)) if self.values else 0.0


PREDICTORS = ("constant", "ewma", "holt", "burst", "moving_average")


def alpha_for(tick_s: float, half_life_s: float) -> float:
    """EWMA alpha such that an old value's weight halves every `half_life_s` seconds."""
    tick_s, half_life_s = max(_clean(tick_s), 1e-6), max(_clean(half_life_s), 1e-6)
    return min(1.0, max(1e-6, 1.0 - 0.5 ** (tick_s / half_life_s)))


def make_predictor(name: str, tick_s: float = 1.0, half_life_s: float = 4.0) -> Predictor:
    a = alpha_for(tick_s, half_life_s)
    if name == "constant":
        return Constant()
    if name == "ewma":
        return EWMA(a)
    if name == "holt":
        return Holt(alpha=max(a, 0.05), beta=max(a / 2, 0.02))
    if name == "burst":
        return Burst(a)
    if name == "moving_average":
        return MovingAverage(max(1, int(round(half_life_s / max(tick_s, 1e-6)))))
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")
