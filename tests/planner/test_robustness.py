"""Property tests: random views, including zeros, NaN and garbage, never raise, never produce
NaN/inf in the planner's inputs, and never flip a worker twice within the minimum dwell."""
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.planner import ClassStats, ClusterView, Planner, PlannerConfig, PerfProfile, WorkerView
from tandem.planner.synthetic import synthetic_profile

PROF = PerfProfile.from_dict(synthetic_profile())
DWELL = 5.0

num = st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e7, allow_nan=False),
                st.floats(allow_nan=True, allow_infinity=True), st.none())
small = st.one_of(st.just(0), st.integers(min_value=0, max_value=5000), st.integers(-5, -1))


@st.composite
def worker(draw, i):
    return WorkerView(
        worker_id=f"w{i}", role=draw(st.sampled_from(["prefill", "decode", "both"])),
        state=draw(st.sampled_from(["active", "active", "active", "draining", "flipping",
                                    "starting", "stopped"])),
        since=draw(st.one_of(st.floats(0, 100, allow_nan=False), st.just(math.nan))),
        waiting_prefill_tokens=draw(num), num_waiting=draw(small), num_running=draw(small),
        kv_usage=draw(st.one_of(st.floats(0, 1), num)), kv_capacity_tokens=draw(small),
        step_time_s=draw(num), prefill_tokens_per_s=draw(num), decode_tokens_per_s=draw(num),
        target_role=draw(st.sampled_from([None, "prefill", "decode"])))


@st.composite
def class_stats(draw):
    return ClassStats(
        arrivals=draw(small), prompt_tokens=draw(num), uncached_prompt_tokens=draw(num),
        isl_p90=draw(num), completions=draw(small), output_tokens=draw(num),
        generated_tokens=draw(num), ttft_p90_ms=draw(num), tpot_p90_ms=draw(num),
        ttft_p50_ms=draw(num), tpot_p50_ms=draw(num))


@st.composite
def views(draw):
    n = draw(st.integers(0, 8))
    ws = [draw(worker(i)) for i in range(n)]
    classes = {f"c{k}": draw(class_stats()) for k in range(draw(st.integers(0, 3)))}
    return ws, classes, draw(st.one_of(num, st.just(1.0))), draw(num)


def _finite_tree(x):
    if isinstance(x, float):
        assert math.isfinite(x), x
    elif isinstance(x, dict):
        for v in x.values():
            _finite_tree(v)
    elif isinstance(x, list):
        for v in x:
            _finite_tree(v)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(views(), min_size=1, max_size=8),
       st.sampled_from(["constant", "ewma", "holt", "burst"]),
       st.booleans())
def test_random_views_never_break_the_planner(seq, predictor, scaling):
    kw = dict(min_gpus=2, max_gpus=16) if scaling else {}
    pl = Planner(PlannerConfig(slo_ttft_ms=800, slo_tpot_ms=60, min_dwell_s=DWELL,
                               predictor=predictor, **kw), PROF)
    last_flip: dict = {}
    now = 0.0
    for ws, classes, window, _ in seq:
        now += 1.0
        view = ClusterView(now=now, workers=ws, window_s=window, classes=classes,
                           prefill_queue_wait_p90_s=_)
        ds = pl.tick(view)
        for d in ds:
            json.dumps(d.to_dict(), allow_nan=False)
            _finite_tree(d.inputs)
            assert d.reason
            if d.action == "flip":
                assert d.from_role in ("prefill", "decode") and d.to_role in ("prefill", "decode")
                assert d.from_role != d.to_role
                if d.worker_id in last_flip:
                    assert now - last_flip[d.worker_id] >= DWELL
                last_flip[d.worker_id] = now
        _finite_tree(pl.last_inputs)
        json.dumps(pl.status(), allow_nan=False)
        assert all(math.isfinite(v) for v in pl.metrics().values())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 200))
def test_zero_traffic_never_flips(p, d, ticks):
    ws = [WorkerView(f"p{i}", "prefill") for i in range(p)] + \
         [WorkerView(f"d{i}", "decode") for i in range(d)]
    pl = Planner(PlannerConfig(min_dwell_s=0, cooldown_s=0, reverse_cooldown_s=0), PROF)
    for t in range(ticks):
        ds = pl.tick(ClusterView(now=float(t), workers=ws, window_s=1.0,
                                 classes={"chat": ClassStats()}))
        assert not [x for x in ds if x.action in ("flip", "start", "stop")]
    _finite_tree(pl.last_inputs)
