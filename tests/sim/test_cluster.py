"""The discrete-event cluster: determinism, conservation, disaggregation, connector actions,
router equivalence, report format."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.sim.cluster import ClusterConfig, SimCluster
from tandem.sim.profile import SimProfile

from .util import random_reqs, reqs, run, stable


def test_same_seed_same_report(profile_dict):
    specs = random_reqs(200, seed=11, rate=80.0, shared=True)
    flags = ("--prefill", "1", "--decode", "2", "--kv-blocks", "500", "--seed", "7")
    a, _ = run(profile_dict, specs, *flags)
    b, _ = run(profile_dict, random_reqs(200, seed=11, rate=80.0, shared=True), *flags)
    assert json.dumps(stable(a), sort_keys=True) == json.dumps(stable(b), sort_keys=True)


def test_same_seed_same_report_from_cli_workload(profile_path, tmp_path):
    from tandem.sim.cli import main
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        assert main(["--workload", "bursty", "--rate", "6", "--duration", "20", "--seed", "3",
                     "--gpus", "3", "--profile", profile_path, "--out", str(out), "--quiet"]) == 0
        outs.append(stable(json.loads(out.read_text())))
    assert outs[0] == outs[1]
    out = tmp_path / "r2.json"
    main(["--workload", "bursty", "--rate", "6", "--duration", "20", "--seed", "4",
          "--gpus", "3", "--profile", profile_path, "--out", str(out), "--quiet"])
    assert stable(json.loads(out.read_text()))["requests"] != outs[0]["requests"]


@pytest.mark.parametrize("flags", [("--gpus", "3"), ("--prefill", "1", "--decode", "2")])
def test_conservation_and_no_leaks(profile_dict, flags):
    specs = random_reqs(300, seed=2, rate=150.0, shared=True)
    specs += reqs([(0.5, 40000, 10)])            # longer than any worker's KV: refused (HTTP 400)
    from tandem.bench.traces import finalize
    specs = finalize(specs)
    report, cluster = run(profile_dict, specs, "--kv-blocks", "600", *flags)
    o = report["summary"]["overall"]
    assert o["requests_total"] == len(specs) == o["requests_completed"] + o["requests_failed"]
    assert o["requests_failed"] == 1 and o["errors"] == {"http_400": 1}
    assert cluster.leaks() == {}
    for w in cluster.workers:
        e = w.engine
        assert e.kv.pool.num_used == 0 and not e.requests and not e.held and e._win is None
        assert not e.scheduler.waiting and not e.scheduler.running
    assert cluster.completed + cluster.failed == cluster.sent == len(specs)
    for r in report["requests"]:
        if r["status"] == "ok":
            assert r["output_tokens"] == r["osl_requested"] == len(r["token_times_s"])


def test_disaggregated_flow_accounts_transfer_time(profile_dict):
    p = SimProfile(profile_dict)
    specs = reqs([(0.0, 300, 4)])
    report, cluster = run(profile_dict, specs, "--prefill", "1", "--decode", "1",
                          "--transfer-latency-ms", "2")
    r = report["requests"][0]
    t1 = p.prefill_time(300)
    xfer = 0.002 + 300 * 131072 / 100e9
    want = [t1, t1 + xfer + p.decode_time(1, 301)]
    want.append(want[-1] + p.decode_time(1, 302))
    want.append(want[-1] + p.decode_time(1, 303))
    # (report times are rounded to the microsecond, as tandem bench's)
    assert r["ttft_s"] == pytest.approx(t1, abs=1e-6)
    assert r["token_times_s"] == pytest.approx(want, abs=1e-6)
    assert r["e2e_s"] == pytest.approx(want[-1], abs=1e-6)
    pw, dw = cluster.workers
    assert pw.role == "prefill" and dw.role == "decode"
    assert pw.engine._stats.prompt_tokens_computed == 300 and pw.engine._stats.generated_tokens == 1
    assert dw.engine._stats.prompt_tokens_computed == 0 and dw.engine._stats.generated_tokens == 3
    assert cluster.leaks() == {}


def test_disaggregated_under_load_moves_every_request(profile_dict):
    specs = random_reqs(200, seed=4, rate=100.0, osl=(2, 80))
    report, cluster = run(profile_dict, specs, "--prefill", "2", "--decode", "2", "--local-prefill-tokens", "0",
                          "--prefill-queue-factor", "0")
    pws = [w for w in cluster.workers if w.role == "prefill"]
    dws = [w for w in cluster.workers if w.role == "decode"]
    assert sum(w.engine._stats.generated_tokens for w in pws) == 200          # first tokens
    assert sum(w.engine._stats.prompt_tokens_computed for w in dws) == 0      # nothing recomputed
    gen = sum(w.engine._stats.generated_tokens for w in cluster.workers)
    assert gen == sum(r["output_tokens"] for r in report["requests"])
    assert report["summary"]["overall"]["requests_completed"] == 200


class _FlipAt:
    """A planner stub: at its first tick, flip `worker` to `role`."""

    def __init__(self, worker: str, role: str):
        self.worker, self.role, self.done = worker, role, False

    def tick(self, now, view):
        from tandem.planner.types import Decision
        if self.done:
            return []
        self.done = True
        w = next(x for x in view.workers if x.worker_id == self.worker)
        return [Decision(time=now, action="flip", worker_id=self.worker, from_role=w.role,
                         to_role=self.role, reason="test")]


def _cluster(profile_dict, specs, roles, planner=None, **kw):
    cfg = ClusterConfig(roles=roles, planner_tick_s=1.0, **kw)
    cfg.engine.block_size = 16
    return SimCluster(SimProfile(profile_dict), cfg, specs, planner=planner)


def test_role_flip_of_an_idle_worker_takes_role_flip_s(profile_dict):
    pytest.importorskip("tandem.planner.types")
    specs = reqs([(0.0, 100, 5), (3.0, 100, 5)])
    c = _cluster(profile_dict, specs, ["prefill", "decode", "decode"], planner=_FlipAt("w2", "prefill"))
    c.run()
    w2 = c.workers[2]
    assert c.decisions and c.decisions[0]["action"] == "flip"
    assert w2.role == "prefill" and w2.state == "active"
    assert w2.since == pytest.approx(1.0 + profile_dict["role_flip_s"])
    pools = {round(e["t_s"]): e["pools"] for e in c.timeline}
    assert pools[1] == {"prefill": 2, "decode": 1}          # counted in its new pool while flipping
    assert c.completed == 2 and c.leaks() == {}


def test_flip_of_a_busy_decode_worker_migrates_its_decodes(profile_dict):
    pytest.importorskip("tandem.planner.types")
    specs = reqs([(0.0, 200, 400), (0.01, 200, 400), (0.02, 200, 400), (0.03, 200, 400)])
    c = _cluster(profile_dict, specs, ["prefill", "decode", "decode"], planner=_FlipAt("w1", "prefill"),
                 router_mode="round-robin")
    c.run()
    w1 = c.workers[1]
    assert w1.role == "prefill"
    assert w1.since > 1.0 + profile_dict["role_flip_s"]       # waited for its decodes to move
    assert w1.since < 1.1 + profile_dict["role_flip_s"]       # ... which is a KV transfer, not a drain
    assert c.completed == 4 and c.failed == 0 and c.leaks() == {}
    recs = c.records()
    assert all(r.output_tokens == 400 and len(r.token_times_s) == 400 for r in recs)


def test_no_prefill_worker_decode_workers_serve_whole_requests(profile_dict):
    """1P1D -> 0P2D (the server's min_prefill 0): with no prefill worker, the decode workers take whole
    requests, as the frontend does (`no_prefill_worker`); nothing waits for a prefill pool forever."""
    pytest.importorskip("tandem.planner.types")
    specs = reqs([(t * 0.25, 300, 20) for t in range(40)])
    c = _cluster(profile_dict, specs, ["prefill", "decode"], planner=_FlipAt("w0", "decode"))
    c.run()
    assert [w.role for w in c.workers] == ["decode", "decode"]
    assert c.completed == 40 and c.failed == 0 and c.leaks() == {}
    assert sum(w.engine._stats.prompt_tokens_computed for w in c.workers) >= 30 * 300   # prefilled there


def test_requests_no_worker_can_take_fail_instead_of_ticking_forever(profile_dict):
    """Only a worker being stopped: requests queue for a worker that never comes. The run must end
    (they fail as no_worker) rather than tick the planner forever."""
    pytest.importorskip("tandem.planner.types")

    class StopAll:
        def tick(self, now, view):
            from tandem.planner.types import Decision
            return [Decision(time=now, action="stop", worker_id=w.worker_id, reason="test")
                    for w in view.workers if w.state == "active"]

    specs = reqs([(0.0, 100, 5), (5.0, 100, 5)])
    c = _cluster(profile_dict, specs, ["both"], planner=StopAll(), stall_timeout_s=30.0)
    c.run()
    assert c.completed == 1 and c.failed == 1
    assert c.now < 5.0 + 30.0 + 5.0


def test_start_and_stop_workers(profile_dict):
    pytest.importorskip("tandem.planner.types")

    class Scale:
        def __init__(self):
            self.n = 0

        def tick(self, now, view):
            from tandem.planner.types import Decision
            self.n += 1
            if self.n == 1:
                return [Decision(time=now, action="start", to_role="both", reason="test"),
                        Decision(time=now, action="stop", worker_id="w0", reason="test")]
            return []

    specs = reqs([(t * 0.5, 200, 50) for t in range(30)])
    c = _cluster(profile_dict, specs, ["both", "both"], planner=Scale())
    c.run()
    w0, w1, w2 = c.workers
    assert w0.state == "stopped" and w0.stopped_at >= 1.0
    assert w2.state == "active" and w2.since == pytest.approx(1.0 + profile_dict["worker_start_s"])
    assert c.completed == 30 and c.leaks() == {}
    assert c.gpu_seconds() == pytest.approx(w0.stopped_at + c.now + (c.now - 1.0))


def test_real_planner_runs_in_virtual_time(profile_path, tmp_path):
    pytest.importorskip("tandem.planner.planner")
    from tandem.sim.cli import main
    out = tmp_path / "p.json"
    assert main(["--workload", "bursty", "--rate", "5", "--duration", "60", "--prefill", "2",
                 "--decode", "2", "--planner", "--slo-ttft-ms", "500", "--slo-tpot-ms", "40",
                 "--profile", profile_path, "--out", str(out), "--quiet"]) == 0
    rep = json.loads(out.read_text())
    assert rep["config"]["sim"]["planner"] == "tandem"
    assert rep["summary"]["overall"]["requests_failed"] == 0
    assert rep["config"]["sim"]["kv_leaks"] == {}


@pytest.mark.parametrize("flags", [("--gpus", "4"), ("--prefill", "2", "--decode", "3")])
def test_indexed_router_decides_like_kv_router(profile_dict, flags):
    """tandem.sim.fastrouter.IndexedKvRouter makes exactly KvRouter's choices."""
    specs = random_reqs(250, seed=9, rate=150.0, shared=True)
    a, ca = run(profile_dict, specs, "--router-impl", "indexed", *flags)
    b, cb = run(profile_dict, specs, "--router-impl", "base", *flags)
    assert a["requests"] == b["requests"]
    assert ca.router.decisions == cb.router.decisions
    assert sum(ca.router.decisions.values()) >= 250


def test_report_has_the_bench_format(profile_dict):
    from dataclasses import fields

    from tandem.bench.metrics import summarize
    from tandem.bench.records import RequestRecord
    specs = random_reqs(40, seed=1, rate=30.0)
    report, _ = run(profile_dict, specs, "--gpus", "2", "--slo-ttft-ms", "200", "--slo-tpot-ms", "30",
                    "--gpu-hour-usd", "2.5")
    assert set(report) == {"config", "summary", "requests", "timeline", "client"}
    m_keys = set(summarize([], 1.0))
    for name, m in report["summary"].items():
        assert set(m) == m_keys, name
    assert set(report["summary"]) == {"overall", "chat", "batch"}
    assert all(set(r) == {f.name for f in fields(RequestRecord)} for r in report["requests"])
    o = report["summary"]["overall"]
    assert o["goodput"] is not None and o["cost_per_mtok_usd"] is not None and o["gpu_hours"] > 0
    bench_config_keys = {
        "tool", "version", "label", "started_at", "wall_s", "url", "endpoint", "model", "server_is_tandem",
        "cluster_polled", "source", "plan", "time_scale", "trace_start_s", "duration_limit_s",
        "max_requests", "rate", "arrival", "seed", "max_isl", "max_osl", "classify", "prompt_mode",
        "tokenizer", "ignore_eos", "send_priority", "priority_format", "max_concurrency", "slo_ttft_ms",
        "slo_tpot_ms", "slo_by_class", "gpus", "gpu_hour_usd"}
    assert bench_config_keys <= set(report["config"])
    tl = report["timeline"]
    assert tl and all({"t_s", "sent", "completed", "failed", "in_flight", "output_tokens", "pools",
                       "num_gpus"} <= set(e) for e in tl)


def test_sim_never_imports_torch():
    code = ("import sys; import tandem.sim.cli, tandem.sim.run, tandem.sim.cluster, tandem.sim.fastrouter, "
            "tandem.engine.sim_engine; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sim_records_serialise_like_request_records(profile_dict):
    from dataclasses import asdict

    from tandem.bench.records import RequestRecord
    from tandem.bench.report import build_report
    _, cluster = run(profile_dict, random_reqs(30, seed=1, rate=30.0), "--gpus", "1")
    recs = cluster.records()
    base = [RequestRecord(**asdict(r)) for r in recs]
    assert [r.to_dict() for r in recs] == [b.to_dict() for b in base]
    assert [r.to_dict(None) for r in recs] == [b.to_dict(None) for b in base]
    cfg = {"slo_ttft_ms": 100, "gpus": 1}
    assert json.dumps(build_report(cfg, recs, cluster.timeline)) == json.dumps(build_report(cfg, base, cluster.timeline))


def test_spill_sends_batch_prompts_to_decode_workers_when_the_prefill_queue_is_long(profile_dict):
    """A summarization flood on 1P1D: without spill every batch prompt queues on the one prefill worker;
    with it (the same DisaggPolicy rule as the frontend) the decode worker prefills some of them in its
    own steps, capped next to decodes, and first tokens come sooner. Every request completes."""
    specs = reqs([(0.01 * i, 1500, 8, "batch") for i in range(60)] +
                 [(0.005 + 0.02 * i, 40, 60, "interactive") for i in range(30)])
    base = ["--prefill", "1", "--decode", "1", "--local-prefill-tokens", "0"]
    off, c_off = run(profile_dict, specs, *base)
    on, c_on = run(profile_dict, specs, *base, "--spill-batch", "--prefill-chunk-while-decoding", "128")
    n_off, n_on = (c.disagg_decisions.get("local_prefill_queue_long", 0) for c in (c_off, c_on))
    assert n_off <= 30 < n_on                    # without spill only the chats' prompts moved
    assert on["config"]["sim"]["disagg_decisions"] == c_on.disagg_decisions
    for r in (off, on):
        assert r["summary"]["overall"]["requests_completed"] == 90
    t_off, t_on = (r["summary"]["batch"]["ttft_ms"]["p90"] for r in (off, on))
    assert t_on < 0.8 * t_off
    # the decode worker really prefilled batch prompts: more than all the chats' prompt tokens
    d_off, d_on = (next(w for w in c.workers if w.role == "decode").engine._stats.prompt_tokens_computed
                   for c in (c_off, c_on))
    assert d_off <= 30 * 40 and d_on >= 1500
