"""PlannerLoop drives a planner through sync and async connectors; WindowStats builds views."""
import asyncio
import json

import pytest

from tandem.planner import (ClassStats, ClusterView, InMemoryConnector, Planner, PlannerConfig,
                            PerfProfile, PlannerLoop, WindowStats, WorkerView)
from tandem.planner.synthetic import synthetic_profile
from tandem.planner.window import percentile

PROF = PerfProfile.from_dict(synthetic_profile())
HEAVY = {"s": ClassStats(arrivals=60, prompt_tokens=60 * 4000, ttft_p90_ms=5000.0)}


def workers():
    return [WorkerView("p0", "prefill"), WorkerView("d0", "decode"), WorkerView("d1", "decode"),
            WorkerView("d2", "decode")]


def test_loop_with_sync_connector_and_fake_clock():
    conn = InMemoryConnector(workers(), role_flip_s=1.0)
    pl = Planner(PlannerConfig(min_dwell_s=0, cooldown_s=0), PROF)
    t = {"now": 100.0}

    async def fake_sleep(s):
        t["now"] += s

    def get_view(now):
        conn.advance(now)
        return ClusterView(now=now, workers=conn.workers(), window_s=1.0, classes=HEAVY)

    loop = PlannerLoop(pl, conn, get_view, clock=lambda: t["now"], sleep=fake_sleep)
    asyncio.run(loop.run(max_ticks=5))
    assert loop.ticks == 5
    assert any(c[0] == "flip" for c in conn.calls)
    assert any(w.role == "prefill" and w.worker_id != "p0" for w in conn.workers())
    st = loop.status()
    json.dumps(st, allow_nan=False)
    assert st["loop"]["ticks"] == 5 and st["decisions"]


def test_loop_with_async_connector_and_errors():
    class AsyncConn:
        def __init__(self):
            self.flipped = []

        async def workers(self):
            return workers()

        async def flip(self, wid, role):
            await asyncio.sleep(0)
            self.flipped.append((wid, role))

        async def start_worker(self, role):
            return None

        async def stop_worker(self, wid, graceful=True):
            raise RuntimeError("boom")

    conn = AsyncConn()
    pl = Planner(PlannerConfig(min_dwell_s=0, cooldown_s=0), PROF)

    async def get_view(now):
        return ClusterView(now=now, workers=await conn.workers(), window_s=1.0, classes=HEAVY)

    loop = PlannerLoop(pl, conn, get_view, tick_s=0.25)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop=stop))
        await asyncio.sleep(0.6)
        stop.set()
        await task

    asyncio.run(main())
    assert loop.ticks >= 2 and conn.flipped

    class Broken:
        def tick(self, view):
            raise ValueError("bad")

        def status(self):
            return {}

    lp = PlannerLoop(Broken(), None, lambda now: ClusterView(now=now))
    assert asyncio.run(lp.step(1.0)) == []
    assert lp.status()["loop"]["errors"]


def test_window_stats_view():
    w = WindowStats(window_s=10)
    for i in range(10):
        w.on_arrival(i, "chat", 100, cached_tokens=40)
        w.on_first_token(i + 0.2, "chat", 0.2, queue_wait_s=0.05)
        w.on_tokens(i + 0.5, "chat", 50)
        w.on_finish(i + 1, "chat", 50, tpot_s=0.02)
    v = w.view(9.9, [WorkerView("p0", "prefill")])
    c = v.classes["chat"]
    assert c.arrivals == 10 and c.prompt_tokens == 1000 and c.uncached_prompt_tokens == 600
    assert c.completions == 10 and c.osl_mean == 50
    assert c.ttft_p90_ms == pytest.approx(200) and c.tpot_p90_ms == pytest.approx(20)
    assert v.prefill_queue_wait_p90_s == pytest.approx(0.05)
    # old events leave the window
    v = w.view(100, [])
    assert v.classes["chat"].arrivals == 0 and v.classes["chat"].ttft_p90_ms is None
    assert percentile([], 90) is None and percentile([1, 2, 3, 4], 50) == 2.5
    json.dumps(v.to_dict(), allow_nan=False)
    assert ClusterView.from_dict(v.to_dict()).now == 100
    assert c.slo_events == 0                        # no SLO given: nothing judged


def test_window_counts_slo_misses():
    """With SLOs, each first token and each finish is judged: the planner's flap-damping trial
    compares these shares before and during damping."""
    w = WindowStats(window_s=10, slo_ttft_ms=500, slo_tpot_ms=50)
    for i, (ttft, tpot) in enumerate([(0.1, 0.02), (0.7, 0.02), (0.2, 0.08), (0.9, 0.09)]):
        w.on_first_token(i, "chat", ttft)
        w.on_finish(i + 0.5, "chat", 10, tpot_s=tpot)
    c = w.view(5, []).classes["chat"]
    assert (c.slo_events, c.slo_misses) == (8, 4)
    assert ClusterView.from_dict(w.view(5, []).to_dict()).classes["chat"].slo_misses == 4
