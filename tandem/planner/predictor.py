"""Short-horizon load predictors: `update(value)` once per tick, `predict(horizon_ticks)`.

All are safe at zero traffic: values that are None, NaN, inf or negative are treated as 0 (a
rate cannot be negative), outputs are always finite and >= 0, and a predictor that has seen
nothing predicts 0.

* `Constant`  next = last observed value (Dynamo's "constant" predictor).
* `EWMA`      exponentially weighted moving average; `alpha` per update.
* `Holt`      double exponential smoothing (level + trend), trend damped, clamped at 0.
* `Burst`     max(EWMA, last): jumps up with a burst at once, decays like the EWMA afterwards.
* `MovingAverage`  mean of the last `window` values (the baseline's choice).
* `Seasonal`  a base predictor (burst) plus period detection by autocorrelation; once a period is
              found with enough confidence it forecasts max(base, the values one period ago over the
              horizon), so the planner can start workers `worker_start_s` before a recurring edge.
              With no period detected it is exactly its base predictor.

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


class Seasonal:
    """Base predictor + a period found by autocorrelation of the recent history (bounded deque).

    Why: a cold start (~20 s) cannot catch a load edge once it is seen; a recurring edge can be
    seen one period early. The period is the lag in [min_lag, max_lag] ticks with the highest
    autocorrelation, accepted only if it is >= `threshold` and the history spans >= `cycles`
    periods (so a period is never guessed from one cycle). Re-detected every `every` updates;
    without a period `predict` is the base predictor's, bit for bit.
    """
    name = "seasonal"

    def __init__(self, base: Predictor, min_lag: int = 10, max_lag: int = 600,
                 threshold: float = 0.6, cycles: float = 1.8, every: int = 5) -> None:
        if not 2 <= min_lag <= max_lag:
            raise ValueError(f"need 2 <= min_lag <= max_lag, got {min_lag}, {max_lag}")
        if not 0.0 < threshold < 1.0 or cycles < 1.0 or every < 1:
            raise ValueError("threshold must be in (0, 1), cycles >= 1, every >= 1")
        self.base, self.min_lag, self.max_lag = base, int(min_lag), int(max_lag)
        self.threshold, self.cycles, self.every = threshold, cycles, int(every)
        self.values: deque[float] = deque(maxlen=int(math.ceil(self.max_lag * cycles)) + 1)
        self.period: Optional[int] = None
        self.confidence = 0.0
        self._n = 0

    def update(self, value: float) -> None:
        x = _clean(value)
        self.base.update(x)
        self.values.append(x)
        self._n += 1
        if self._n % self.every == 0:
            self.period, self.confidence = detect_period(
                list(self.values), self.min_lag, self.max_lag, self.threshold, self.cycles)

    def predict(self, horizon: float = 1.0) -> float:
        base = self.base.predict(horizon)
        p = self.period
        if p is None:
            return base
        h = max(1, int(math.ceil(_clean(horizon))))
        v, n = self.values, len(self.values)
        # value at time t+i one period ago: index n-1+i-p, i = 1..h (only what is in history),
        # widened by a tolerance: the period is found to a few ticks and an edge is smeared
        # over the measurement window
        tol = 2 + p // 50
        ahead = [v[j] for j in range(max(0, n - p - tol), min(n, n - p + h + tol))]
        return _out(max(base, max(ahead))) if ahead else base


def detect_period(xs: list, min_lag: int, max_lag: int, threshold: float,
                  cycles: float) -> tuple[Optional[int], float]:
    """(lag, autocorrelation) of the strongest period, or (None, best r) below `threshold`."""
    import numpy as np

    n = len(xs)
    hi = min(max_lag, int(n / cycles))
    if hi < min_lag:
        return None, 0.0
    a = np.asarray(xs, dtype=float)
    a = a - a.mean()
    var = float(np.dot(a, a))
    if var <= 1e-12 * max(1, n):
        return None, 0.0
    best, best_r, crossed = None, 0.0, False
    for lag in range(1, hi + 1):
        x, y = a[lag:], a[:-lag]
        den = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
        r = float(np.dot(x, y)) / den if den > 0 else 0.0
        # a slow trend correlates with itself at short lags: only lags after the
        # autocorrelation first went negative can be a period
        crossed = crossed or r < 0.0
        if crossed and lag >= min_lag and r > best_r + 1e-9:
            best, best_r = lag, r
    return (best, best_r) if best is not None and best_r >= threshold else (None, best_r)


PREDICTORS = ("constant", "ewma", "holt", "burst", "moving_average", "seasonal")


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
    if name == "seasonal":
        # periods of 10 s .. 10 min in ticks, re-detected every ~5 s
        t = max(_clean(tick_s), 1e-6)
        return Seasonal(Burst(a), min_lag=max(2, int(round(10.0 / t))),
                        max_lag=max(3, int(round(600.0 / t))), every=max(1, int(round(5.0 / t))))
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")
