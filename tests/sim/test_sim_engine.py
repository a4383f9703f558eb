"""The simulated engine: Engine API, finish rules, KV bookkeeping, priorities, fast-forward."""
from __future__ import annotations

import pytest

from tandem.common.errors import ContextTooLong, InvalidParams
from tandem.common.sampling import SamplingParams
from tandem.engine.sim_engine import SimEngine, SimEngineConfig, SimKVExport
from tandem.sim.profile import SimProfile

from .util import random_reqs, run


def _engine(profile_dict, **kw):
    return SimEngine(SimProfile(profile_dict), SimEngineConfig(**kw))


def _drain(e):
    outs = []
    while e.has_unfinished_requests():
        outs.extend(e.step())
    return outs


def test_engine_api_and_finish_at_max_tokens(profile_dict):
    e = _engine(profile_dict)
    e.add_request("a", list(range(10, 50)), SamplingParams(max_tokens=5))
    e.add_request("b", 100, SamplingParams(max_tokens=1), priority="batch")
    outs = _drain(e)
    fin = {o.request_id: o for o in outs if o.finished}
    assert fin["a"].num_output_tokens == 5 and fin["a"].finish_reason == "length"
    assert fin["b"].num_output_tokens == 1 and fin["b"].num_prompt_tokens == 100
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == "a") == 5
    st = e.stats()
    assert st.generated_tokens == 6 and st.kv_blocks_used == 0 and st.num_running == 0
    assert e.now > 0


def test_engine_rejects_like_engine(profile_dict):
    e = _engine(profile_dict, max_model_len=1000)
    with pytest.raises(ContextTooLong):
        e.add_request("x", 990, SamplingParams(max_tokens=20))
    with pytest.raises(InvalidParams):
        e.add_request("y", 10, SamplingParams(max_tokens=2), priority="urgent")
    e.add_request("z", 10, SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParams):
        e.add_request("z", 10, SamplingParams(max_tokens=2))
    e2 = _engine(profile_dict, num_kv_blocks=4)
    with pytest.raises(ContextTooLong):
        e2.add_request("big", 60, SamplingParams(max_tokens=10))


def test_hold_kv_export_import(profile_dict):
    """Prefill on one engine (hold_kv, max_tokens=1), import on another: the decode engine starts
    with the prompt computed and generates the remaining tokens."""
    p, d = _engine(profile_dict), _engine(profile_dict)
    p.add_request("r", 200, SamplingParams(max_tokens=1), hold_kv=True)
    outs = _drain(p)
    assert outs[-1].finished and "r" in p.held and p.kv.pool.num_used == 13
    kv = p.export_kv("r")
    assert isinstance(kv, SimKVExport) and kv.num_tokens == 200
    d.add_request("r", 200, SamplingParams(max_tokens=6), output_token_ids=kv.output_token_ids, kv_import=kv)
    req = d.requests["r"]
    assert req.num_computed_tokens == 200 and req.remaining_to_compute == 1
    p.release_kv("r")
    assert p.kv.pool.num_used == 0
    t0 = d.now
    d.step()
    assert d.now - t0 == pytest.approx(d.profile.decode_time(1, 201))
    outs = _drain(d)
    assert outs[-1].finished and outs[-1].num_output_tokens == 6
    assert d.kv.pool.num_used == 0


def test_detach_keeps_kv_for_export(profile_dict):
    for ff in (True, False):
        e = _engine(profile_dict, fast_forward=ff)
        e.add_request("a", 100, SamplingParams(max_tokens=500))
        e.add_request("b", 120, SamplingParams(max_tokens=500))
        e.start(0.0)
        while e.t_next < 0.1:                        # some steps in the discrete-event API
            e.on_event(e.t_next)
        e.observe(0.1)
        e.sync(0.1)
        out = e.detach_request("a")
        assert out is not None and not out.finished and "a" in e.held and "a" not in e.requests
        kv = e.export_kv("a")
        assert kv.num_tokens == 100 + len(kv.output_token_ids) - 1
        used = e.kv.pool.num_used
        e.now += 10.0
        assert e.release_stale_held(5.0) == ["a"] and e.kv.pool.num_used < used


def test_import_falls_back_to_prefill_when_kv_is_short(profile_dict):
    d = _engine(profile_dict, num_kv_blocks=20)
    d.add_request("filler", 250, SamplingParams(max_tokens=50))
    d.step()
    kv = SimKVExport("r", (), [1], 200, 16)
    d.add_request("r", 200, SamplingParams(max_tokens=3), output_token_ids=[1], kv_import=kv)
    assert d.requests["r"].num_computed_tokens == 0          # recompute instead
    _drain(d)
    assert d.kv.pool.num_used == 0


def test_priority_interactive_before_batch_under_load(profile_dict):
    """Same shapes, half interactive, half batch, arriving together on one worker: the scheduler's
    priority order gives interactive requests the lower TTFT."""
    specs = random_reqs(120, seed=3, rate=400.0, isl=(200, 400), osl=(20, 40))
    report, cluster = run(profile_dict, specs, "--gpus", "1")
    s = report["summary"]
    assert s["chat"]["ttft_ms"]["p50"] < 0.5 * s["batch"]["ttft_ms"]["p50"]
    assert s["overall"]["requests_completed"] == 120


def test_preemption_and_no_leaks(profile_dict):
    """A KV cache too small for the load: requests are preempted and recomputed, all finish, and
    every block is back in the pool."""
    specs = random_reqs(80, seed=5, rate=300.0, isl=(100, 600), osl=(50, 150))
    report, cluster = run(profile_dict, specs, "--gpus", "1", "--kv-blocks", "220")
    assert report["config"]["sim"]["preemptions"] > 0
    assert report["summary"]["overall"]["requests_completed"] == 80
    assert report["config"]["sim"]["kv_leaks"] == {}
    for r in report["requests"]:
        assert r["output_tokens"] == r["osl_requested"]
        assert len(r["token_times_s"]) == r["output_tokens"]
        assert r["token_times_s"] == sorted(r["token_times_s"])


@pytest.mark.parametrize("seed,flags", [
    (0, ("--gpus", "1")),
    (6, ("--gpus", "2", "--rate-for-test", "8")),            # light load: long pure decode windows
    (1, ("--gpus", "2", "--kv-blocks", "300")),                 # preemption
    (2, ("--gpus", "2", "--prefix-caching", "on")),             # shared prefixes, KV events
    (3, ("--prefill", "1", "--decode", "2", "--kv-blocks", "400")),
    (4, ("--gpus", "1", "--max-num-seqs", "6", "--aging-s", "0.5")),  # seats full, aging
    # prefix caching off: decode windows hand out block tables lazily (SimEngine._owe)
    (0, ("--gpus", "1", "--prefix-caching", "off")),
    (1, ("--gpus", "2", "--kv-blocks", "300", "--prefix-caching", "off")),
    (3, ("--prefill", "1", "--decode", "2", "--kv-blocks", "400", "--prefix-caching", "off")),
])
def test_fast_forward_equals_per_step(profile_dict, seed, flags):
    """Decode windows (fast-forward) reproduce the per-step engine exactly."""
    rate = 120.0
    if "--rate-for-test" in flags:
        i = flags.index("--rate-for-test")
        rate, flags = float(flags[i + 1]), flags[:i] + flags[i + 2:]
    specs = random_reqs(150, seed=seed, rate=rate, shared=True, osl=(1, 300))
    for router in ("kv", "round-robin"):
        a, ca = run(profile_dict, specs, "--router-mode", router, *flags)
        b, cb = run(profile_dict, specs, "--router-mode", router, "--no-fast-forward", *flags)
        assert a["config"]["sim"]["window_steps"] > 0 and b["config"]["sim"]["window_steps"] == 0
        assert a["config"]["sim"]["engine_steps"] == b["config"]["sim"]["engine_steps"]
        assert a["requests"] == b["requests"]
        assert a["summary"] == b["summary"]
        assert a["timeline"] == b["timeline"]
        assert a["config"]["sim"]["preemptions"] == b["config"]["sim"]["preemptions"]
        assert ca.router.decisions == cb.router.decisions
        assert a["config"]["sim"]["kv_leaks"] == {} and b["config"]["sim"]["kv_leaks"] == {}


def test_serving_overheads_add_to_each_step(profile_dict):
    """step = T_profile + a + s*n_seqs + n*n_new: one new request alone, then its decode steps."""
    base, e = _engine(profile_dict), _engine(profile_dict, step_overhead_s=0.001, seq_overhead_s=0.0002,
                                                new_overhead_s=0.003)
    for x in (base, e):
        x.add_request("a", 100, SamplingParams(max_tokens=4))
        x.add_request("b", 50, SamplingParams(max_tokens=4))
        x.step()
    assert e.now - base.now == pytest.approx(0.001 + 2 * 0.0002 + 2 * 0.003)
    t0, t1 = base.now, e.now
    base.step(), e.step()
    assert (e.now - t1) - (base.now - t0) == pytest.approx(0.001 + 2 * 0.0002)


def test_admission_time_per_prefill_step(profile_dict):
    """new_overhead_per="prefill_step": n is charged once per step holding prefill work (however many
    prompts it admits), and again for every chunk of a prompt longer than the token budget."""
    base = _engine(profile_dict, max_num_batched_tokens=512)
    e = _engine(profile_dict, max_num_batched_tokens=512, new_overhead_s=0.003, new_overhead_per="prefill_step")
    for x in (base, e):
        x.add_request("a", 100, SamplingParams(max_tokens=4))
        x.add_request("b", 50, SamplingParams(max_tokens=4))
        x.step()
    assert e.now - base.now == pytest.approx(0.003)               # two prompts, one step: once
    for x in (base, e):
        x.step()                                                   # decode only: nothing
    assert e.now - base.now == pytest.approx(0.003)
    for x in (base, e):
        x.add_request("c", 1200, SamplingParams(max_tokens=2))    # three chunks of <= 510 tokens
        for _ in range(3):
            x.step()
    assert e.now - base.now == pytest.approx(4 * 0.003)
    with pytest.raises(ValueError, match="new_overhead_per"):
        _engine(profile_dict, new_overhead_per="token")


@pytest.mark.parametrize("quantiles,per", [(False, "request"), (True, "request"), (True, "prefill_step")])
def test_fast_forward_equals_per_step_with_overheads(profile_dict, quantiles, per):
    """The per-sequence and per-new-request terms (constant, or drawn per request from measured
    quantiles) keep decode windows exact and runs deterministic."""
    specs = random_reqs(120, seed=5, rate=60.0, osl=(1, 200))
    ovh = ("--step-overhead-ms", "0.5", "--seq-overhead-ms", "0.07")
    prof = profile_dict
    if quantiles:
        prof = dict(profile_dict, serving_overhead={"new_q": [-0.001, 0.0, 0.001, 0.004, 0.05]})
    else:
        ovh += ("--new-overhead-ms", "2")
    ovh += ("--new-overhead-per", per)
    a, _ = run(prof, specs, "--gpus", "1", *ovh)
    b, _ = run(prof, specs, "--gpus", "1", "--no-fast-forward", *ovh)
    a2, _ = run(prof, specs, "--gpus", "1", *ovh)
    c, _ = run(profile_dict, specs, "--gpus", "1")
    assert a["config"]["sim"]["window_steps"] > 0
    assert a["requests"] == b["requests"] == a2["requests"] and a["summary"] == b["summary"]
    assert a["summary"]["overall"]["tpot_ms"]["p50"] > c["summary"]["overall"]["tpot_ms"]["p50"]
    if quantiles:
        assert a["config"]["sim"]["engine"]["new_overhead_q_ms"] == pytest.approx([-1.0, 0.0, 1.0, 4.0, 50.0])
        assert a["config"]["sim"]["engine"]["new_overhead_per"] == per
        # the draw spreads TTFT: its p90 grows more than its p50 over the no-overhead run
        d50 = a["summary"]["overall"]["ttft_ms"]["p50"] - c["summary"]["overall"]["ttft_ms"]["p50"]
        d90 = a["summary"]["overall"]["ttft_ms"]["p90"] - c["summary"]["overall"]["ttft_ms"]["p90"]
        assert d90 > d50


@pytest.mark.needs_source
@pytest.mark.parametrize("flags", [("--gpus", "1"), ("--gpus", "2", "--prefix-caching", "on")])
def test_window_rebase_keeps_results(profile_dict, monkeypatch, flags):
    """Long decode windows are renumbered (old step end times dropped) every few steps: records
    (token times included), summary, timeline and router decisions equal the per-step engine's."""
    import tandem.engine.sim_engine as se
    monkeypatch.setattr(se, "_REBASE_STEPS", 32)
    shifted = []

    def rebase(self, w, orig=se.SimEngine._rebase):
        n = len(w.ends)
        orig(self, w)
        shifted.append(n - len(w.ends))
    monkeypatch.setattr(se.SimEngine, "_rebase", rebase)
    specs = random_reqs(80, seed=9, rate=20.0, shared=True, osl=(100, 400))
    a, ca = run(profile_dict, specs, *flags)
    b, cb = run(profile_dict, specs, "--no-fast-forward", *flags)
    assert sum(x > 0 for x in shifted) > 5                   # windows were renumbered many times
    assert a["requests"] == b["requests"] and a["summary"] == b["summary"] and a["timeline"] == b["timeline"]
    assert ca.router.decisions == cb.router.decisions


def test_synthetic_prompt_tokens_are_counted_not_copied(profile_dict):
    """A prompt given as a length keeps a count of its tokens (all SIM_TOKEN) rather than a copy;
    the request reads the same as with a real token list."""
    from tandem.engine.sim_engine import SIM_TOKEN, SimTokens
    e = _engine(profile_dict)
    r = e.add_request("a", 100, SamplingParams(max_tokens=3))
    assert isinstance(r.all_token_ids, SimTokens) and r.num_tokens == 100 and r.remaining_to_compute == 100
    assert r.all_token_ids[95:200] == [SIM_TOKEN] * 5 and r.all_token_ids[-1] == SIM_TOKEN
    outs = _drain(e)
    assert r.num_tokens == 103 and list(r.all_token_ids) == [SIM_TOKEN] * 103
    assert [o.new_token_ids for o in outs] == [[SIM_TOKEN]] * 3
    lst = e.add_request("b", [5] * 10, SamplingParams(max_tokens=1))
    assert lst.all_token_ids == [5] * 10                     # a real prompt is a list, as before
