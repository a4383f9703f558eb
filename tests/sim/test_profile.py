"""Step-time model vs the (synthetic) profile, and what the simulated engine charges per step."""
from __future__ import annotations


import pytest

from tandem.common.sampling import SamplingParams
from tandem.engine.sim_engine import SimEngine, SimEngineConfig
from tandem.sim.profile import ProfileError, SimProfile, synthetic_profile


def test_pure_prefill_matches_profile_points(profile_dict):
    p = SimProfile(profile_dict)
    for n, t in zip(profile_dict["prefill"]["tokens"], profile_dict["prefill"]["time_s"]):
        assert p.prefill_time(n) == pytest.approx(t, rel=1e-12)
        assert p.step_time(0, 0, n) == pytest.approx(t, rel=1e-12)
    # piecewise linear in between, linear extrapolation beyond
    assert p.prefill_time(384) == pytest.approx((0.012 + 0.020) / 2)
    assert p.prefill_time(2048) == pytest.approx(0.036 + (0.036 - 0.020) / 512 * 1024)


def test_pure_decode_matches_profile_grid(profile_dict):
    p = SimProfile(profile_dict)
    d = profile_dict["decode"]
    for i, b in enumerate(d["batch"]):
        for j, c in enumerate(d["context"]):
            assert p.decode_time(b, c) == pytest.approx(d["time_s"][i][j], rel=1e-12)
            assert p.step_time(b, b * c, 0) == pytest.approx(d["time_s"][i][j], rel=1e-12)
    # the synthetic grid is bilinear in (b, c) at these points, so interpolation is exact
    assert p.decode_time(20, 2000) == pytest.approx(0.005 + 0.0001 * 20 + 1e-8 * 20 * 2000, rel=1e-9)


def test_cached_context_and_mixed_step(profile_dict):
    p = SimProfile(profile_dict)
    # X(c, n) = (Q(c) - Q(0)) * n / new_tokens
    assert p.ctx_extra(1024, 256) == pytest.approx(0.002)
    assert p.prefill_time(256, 1024) == pytest.approx(0.012 + 0.002)
    b, c, n = 8, 1024, 256
    d, d0 = p.decode_time(b, c), p.decode_time(b, 0)
    # shared (default): max(P(N + b) + X(c, N + b), D(b, 0)) + D(b, c) - D(b, 0)
    assert p.step_time(b, b * c, n) == pytest.approx(max(p.linear_time(n + b), d0) + d - d0)
    assert p.mixed_step_time(n, 1024, b, c) == pytest.approx(
        max(p.linear_time(n + b) + p.ctx_extra(1024, n + b), d0) + d - d0)
    assert p.mixed_step_time(n, 0, b, c, model="sum") == pytest.approx(p.prefill_time(n) + d)
    assert p.mixed_step_time(n, 0, b, c, model="max") == pytest.approx(max(p.prefill_time(n), d))
    profile_dict["mixed_model"] = "sum"
    assert SimProfile(profile_dict).step_time(b, b * c, n) == pytest.approx(p.prefill_time(n) + d)
    profile_dict["mixed_model"] = "fancy"
    with pytest.raises(ProfileError):
        SimProfile(profile_dict)


def test_step_times_equal_the_profile_schema(profile_dict):
    """The simulator's step-time model is tandem.profile.schema.Profile's (same formulas)."""
    schema = pytest.importorskip("tandem.profile.schema")
    import random
    for d in (profile_dict, synthetic_profile()):
        ref = schema.Profile.from_dict(d)
        p = SimProfile(d)
        rng = random.Random(0)
        for _ in range(300):
            n, cached = rng.randint(1, 9000), rng.choice([0, rng.randint(1, 40000)])
            b, c = rng.randint(1, 600), rng.uniform(1, 30000)
            assert p.prefill_time(n, cached) == pytest.approx(ref.prefill_time(n, cached), rel=1e-9, abs=1e-12)
            assert p.decode_time(b, c) == pytest.approx(ref.decode_time(b, c), rel=1e-9, abs=1e-12)
            for m in ("shared", "sum", "max"):
                assert p.mixed_step_time(n, cached, b, c, model=m) == pytest.approx(
                    ref.mixed_step_time(n, cached, b, c, model=m), rel=1e-9, abs=1e-12)


def test_transfer_time(profile_dict):
    p = SimProfile(profile_dict)
    # 1000 tokens x 128 KiB at 100 GB/s
    assert p.transfer_time(1000) == pytest.approx(1000 * 131072 / 100e9)
    assert p.transfer_time(1000, gbps=50.0, latency_s=0.001) == pytest.approx(0.001 + 1000 * 131072 / 50e9)
    assert p.kv_blocks(16) == 2000


def test_bad_profiles(profile_dict):
    with pytest.raises(ProfileError):
        SimProfile({"prefill": {"tokens": [1], "time_s": [0.1]}})
    d = dict(profile_dict)
    d["decode"] = {"batch": [1, 2], "context": [1], "time_s": [[0.1]]}
    with pytest.raises(ProfileError):
        SimProfile(d)
    with pytest.raises(ProfileError):
        SimProfile.load("/nonexistent/profile.json")


def test_synthetic_roofline_profile_is_labelled():
    d = synthetic_profile()
    assert d["synthetic"] is True and "NOT measured" in d["command"]
    p = SimProfile(d)
    assert p.decode_time(64, 2048) > p.decode_time(1, 2048) > 0
    assert SimProfile.load("synthetic:1b").synthetic


def test_engine_charges_profile_time_per_step(profile_dict):
    """One request alone: the prefill step costs P(isl), each decode step D(1, context)."""
    p = SimProfile(profile_dict)
    e = SimEngine(p, SimEngineConfig(fast_forward=False))
    e.add_request("a", 300, SamplingParams(max_tokens=4, ignore_eos=True))
    t0 = e.now
    outs = e.step()
    assert e.now - t0 == pytest.approx(p.prefill_time(300))
    assert outs[0].new_token_ids and not outs[0].finished
    for k in range(3):
        t0 = e.now
        outs = e.step()
        assert e.now - t0 == pytest.approx(p.decode_time(1, 300 + k + 1))
    assert outs[0].finished and outs[0].finish_reason == "length" and outs[0].num_output_tokens == 4
    assert e.kv.pool.num_used == 0 and not e.has_unfinished_requests()


def test_engine_chunked_prefill_uses_cached_context_cost(profile_dict):
    p = SimProfile(profile_dict)
    e = SimEngine(p, SimEngineConfig(fast_forward=False, max_num_batched_tokens=256))
    e.add_request("a", 600, SamplingParams(max_tokens=1))
    times = []
    while e.has_unfinished_requests():
        t0 = e.now
        e.step()
        times.append(e.now - t0)
    assert times == pytest.approx([p.prefill_time(256), p.prefill_time(256, 256), p.prefill_time(88, 512)])
    assert e.busy_s == pytest.approx(sum(times))


def test_serving_overhead_section(profile_dict):
    """Old profiles read as zero overheads; the section is validated; flags win over it."""
    import argparse

    from tandem.sim.run import resolve_overheads
    assert SimProfile(profile_dict).serving.step_s == 0.0 and SimProfile(profile_dict).serving.new_s == 0.0
    d = dict(profile_dict, serving_overhead={"step_s": 0.0005, "seq_s": 6e-5, "new_s": 0.0027, "request_s": 0.002,
                                             "source": "test"})
    p = SimProfile(d)
    assert (p.serving.step_s, p.serving.seq_s, p.serving.new_s, p.serving.request_s) == (0.0005, 6e-5, 0.0027, 0.002)
    args = argparse.Namespace(step_overhead_ms=None, seq_overhead_ms=0.1, new_overhead_ms=None,
                              request_overhead_ms=None)
    got = resolve_overheads(args, p)
    assert got["step_ms"] == pytest.approx(0.5) and got["seq_ms"] == 0.1 and got["request_ms"] == pytest.approx(2.0)
    assert got["from"]["seq_ms"] == "flag" and got["from"]["step_ms"] == "profile"
    assert p.serving.new_q is None and p.serving.new_per == "request"       # older profiles: per request
    assert got["new_per"] == "request" and got["from"]["new_per"] == "profile"
    assert SimProfile(dict(profile_dict, serving_overhead={"new_per": "prefill_step"})).serving.to_dict()["new_per"] \
        == "prefill_step"
    assert SimProfile(dict(profile_dict, serving_overhead={"new_q": [-0.001, 0.002, 0.04]})).serving.new_q == \
        (-0.001, 0.002, 0.04)
    for bad in ({"step_s": -1}, {"seq_s": "x"}, [1, 2], {"new_q": [0.003, 0.001]}, {"new_q": [0.001]},
                {"new_q": ["a", 1]}, {"new_per": "token"}):
        with pytest.raises(ProfileError, match="serving_overhead"):
            SimProfile(dict(profile_dict, serving_overhead=bad))


def test_worker_part_of_a_profile(profile_dict):
    """calibrate's comparison line: a_w + s_w*b fitted to tandem profile's in-process worker timings."""
    from tandem.sim.calibrate import worker_part
    assert worker_part(SimProfile(profile_dict)) is None
    wo = {"batch": [1, 8, 32], "engine_step_s": [0.002, 0.003, 0.004],
          "worker_step_s": [0.002 + 1e-4 + 2e-5, 0.003 + 1e-4 + 8 * 2e-5, 0.004 + 1e-4 + 32 * 2e-5],
          "admission_tokens": [128, 1024], "admission_s": [0.001, 0.003]}
    wp = worker_part(SimProfile(dict(profile_dict, worker_overhead=wo)))
    assert wp["step_s"] == pytest.approx(1e-4) and wp["seq_s"] == pytest.approx(2e-5)
    assert wp["admission_s"] == pytest.approx(0.002)
