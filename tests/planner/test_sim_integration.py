"""The planner inside `tandem sim` (virtual time, simulated engines, the real router).

Skipped when the simulator is not importable. The profile is the simulator's SYNTHETIC roofline
profile (not a measurement). The workload swings between all-summarization and all-chat at a
constant rate: the planner must move workers to prefill in the summarization phases and to decode
in the chat phases, and every request must complete exactly once.
"""
import pytest

pytest.importorskip("tandem.sim.run")

from tandem.planner.study import run_one  # noqa: E402

SWING = {"workload": "bursty-swing", "gpus": 4, "duration": 180.0, "prefill": 2,
         "load": 1.0, "profile": "synthetic:8b"}


def _swing(policy, **kw):
    spec = {**SWING, "policy": policy, **kw}
    # 60 s phases so that two phase changes fit in a short run
    import tandem.planner.study as st
    old = st.WORKLOADS["bursty-swing"]
    st.WORKLOADS["bursty-swing"] = {**old, "wl": [
        "burst_period_s=120,burst_duty=0.5,burst_factor=1,burst_mix=0.0", "mix=1.0,chat_osl=1024"]}
    try:
        return run_one(spec)
    finally:
        st.WORKLOADS["bursty-swing"] = old


def test_planner_follows_the_swing_in_the_simulator():
    r = _swing("planner")
    assert r["ok"], r.get("error")
    assert r["failed"] == 0 and r["completed"] == r["requests"]
    tos = {d["to_role"] for d in r["decisions"] if d["action"] == "flip"}
    assert tos == {"prefill", "decode"}, r["decisions"]
    assert not r["kv_leaks"]
    static = _swing("static")
    assert static["ok"]
    assert r["slo_attainment"] >= static["slo_attainment"] + 0.2


def test_zero_traffic_in_the_simulator_is_calm():
    """A few requests, then 70 s with no traffic, then one more: no flip, no NaN, all served."""
    import json

    from tandem.bench.traces import BenchRequest, finalize
    from tandem.planner import Planner, PlannerConfig
    from tandem.sim.cluster import ClusterConfig, SimCluster
    from tandem.sim.profile import SimProfile, synthetic_profile

    prof = SimProfile.coerce(synthetic_profile())
    reqs = finalize([BenchRequest(arrival_s=t, cls="chat", priority="interactive", isl=200, osl=20)
                     for t in (0.0, 0.5, 1.0, 72.0)])
    pl = Planner(PlannerConfig(slo_ttft_ms=1000, slo_tpot_ms=50), prof.raw)
    c = SimCluster(prof, ClusterConfig(roles=["prefill", "decode", "decode"]), reqs, planner=pl)
    c.run()
    assert c.completed == 4 and c.failed == 0
    assert c.now > 70
    assert not [d for d in c.decisions if d["action"] in ("flip", "start", "stop")]
    json.dumps(pl.status(), allow_nan=False)
    assert pl.status()["regime"] in ("idle", "ok")
    assert pl.ticks >= 70


def test_study_argv_is_accepted_by_the_sim_cli():
    from tandem.planner.study import WORKLOADS, sim_argv
    from tandem.sim.cli import build_parser
    for wl in WORKLOADS:
        for pol in ("static", "planner", "planner-scale", "dynamo"):
            a = build_parser().parse_args(sim_argv({"workload": wl, "gpus": 8, "prefill": 3,
                                                    "duration": 60, "policy": pol}))
            assert (a.prefill, a.decode) == (3, 5)
            assert (a.planner is None) == (pol == "static")
