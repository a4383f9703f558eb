"""Capacity math on a SYNTHETIC roofline profile (tandem.planner.synthetic), not a measurement."""
import json
import math

import pytest

from tandem.planner.capacity import (Demand, PerfProfile, ProfileError, decode_workers_needed,
                                     erlang_c, interp1, interp2, load_profile, mdc_wait_quantile,
                                     prefill_workers_needed, workers_needed)
from tandem.planner.synthetic import synthetic_profile


@pytest.fixture(scope="module")
def prof():
    d = synthetic_profile()
    assert d["synthetic"] is True          # clearly labelled: not a measured profile
    return PerfProfile.from_dict(d)


def test_interp1_and_extrapolation():
    xs, ys = [1, 2, 4], [10, 20, 40]
    assert interp1(xs, ys, 3) == pytest.approx(30)
    assert interp1(xs, ys, 8) == pytest.approx(80)      # linear beyond the grid
    assert interp1(xs, ys, 0) == pytest.approx(0)
    assert interp1(xs, ys, -100) == 0.0                 # never negative


def test_interp2_bilinear():
    z = [[1, 2], [3, 4]]
    assert interp2([0, 1], [0, 1], z, 0.5, 0.5) == pytest.approx(2.5)
    assert interp2([0, 1], [0, 1], z, 1, 1) == pytest.approx(4)


def test_prefill_time_monotone_and_chunked(prof):
    ts = [prof.prefill_time(n) for n in (0, 100, 1000, 8192, 8193, 30000)]
    assert ts[0] == 0.0
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    # a prompt longer than the token budget is prefilled in chunks that pay for earlier ones
    assert prof.prefill_time(16384) > 2 * prof.prefill_time(8192) * 0.99
    assert prof.prefill_time(1000, cached=8000) > prof.prefill_time(1000)


def test_prefill_capacity_and_knee(prof):
    cap_short = prof.prefill_capacity_tps(256)
    cap_long = prof.prefill_capacity_tps(60000)
    assert cap_short > cap_long > 0                     # long prompts pay attention
    k = prof.knee_tokens()
    assert 0 < k <= prof.chunk_tokens
    assert k / prof.prefill_time(k) >= 0.9 * max(n / t for n, t in zip(
        prof.prefill_tokens, prof.prefill_time_s) if n <= prof.chunk_tokens)


def test_max_decode_batch_meets_tpot_and_kv(prof):
    for ctx in (256, 1024, 4096):
        for tpot in (0.02, 0.05, 0.1):
            b, step, ok = prof.max_decode_batch(ctx, tpot, kv_frac=0.9)
            if ok:
                assert step <= tpot + 1e-12
                assert b * ctx <= prof.kv_capacity_tokens * 0.9 + ctx
                assert prof.decode_step_time(b + 1, ctx) > tpot or (b + 1) * ctx > prof.kv_capacity_tokens * 0.9
    b, _, ok = prof.max_decode_batch(1024, 1e-6)
    assert (b, ok) == (1, False)                        # infeasible TPOT: flagged
    # longer context -> smaller batch
    assert prof.max_decode_batch(8192, 0.05)[0] < prof.max_decode_batch(512, 0.05)[0]


def test_erlang_c_known_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)       # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)     # textbook value
    assert erlang_c(3, 0) == 0.0 and erlang_c(3, 3) == 1.0
    assert mdc_wait_quantile(4, 5, 1.0) == math.inf
    assert mdc_wait_quantile(4, 0, 1.0) == 0.0
    assert mdc_wait_quantile(10, 5, 1.0) < mdc_wait_quantile(6, 5, 1.0)


def test_workers_needed_zero_demand(prof):
    n = workers_needed(Demand(), prof, 1.0, 0.05)
    assert (n.prefill, n.decode) == (0, 0)
    assert n.prefill_load == 0 and n.decode_load == 0
    assert all(math.isfinite(v) for v in n.info.values() if isinstance(v, float))


def test_workers_needed_monotone_in_load(prof):
    prev = (0, 0)
    for rate in (1, 5, 10, 20, 40, 80):
        n = workers_needed(Demand(rate=rate, isl=2000, osl=300), prof, 1.0, 0.05)
        assert n.prefill >= prev[0] and n.decode >= prev[1]
        prev = (n.prefill, n.decode)
    assert prev[0] > 1 and prev[1] > 1


def test_prefill_sizing_is_queueing_aware(prof):
    d = Demand(rate=20, isl=3000, osl=100)
    cap = prof.prefill_capacity_tps(3000)
    bare = 20 * 3000 / cap
    loose, _, _, _ = prefill_workers_needed(d, prof, ttft_s=5.0, util_max=1.0)
    tight, _, _, info = prefill_workers_needed(d, prof, ttft_s=0.3, util_max=1.0)
    assert loose >= math.ceil(bare) and tight > loose  # tighter TTFT -> more headroom
    assert info["queue_wait_q_s"] <= info["queue_slack_s"] + 1e-9
    # the backlog adds demand
    more, _, _, _ = prefill_workers_needed(Demand(rate=20, isl=3000, prefill_backlog_tokens=5e5),
                                           prof, ttft_s=5.0, util_max=1.0, drain_s=2.0)
    assert more > loose


def test_decode_sizing_by_throughput_and_inflight(prof):
    n1, _, ok, info = decode_workers_needed(Demand(rate=50, isl=200, osl=500), prof, 0.05)
    assert ok and n1 >= 1
    n2, _, _, _ = decode_workers_needed(Demand(rate=50, isl=200, osl=500, decode_inflight=5000),
                                        prof, 0.05)
    assert n2 > n1


def test_profile_loading(tmp_path, prof):
    p = tmp_path / "prof.json"
    p.write_text(json.dumps(synthetic_profile()))
    loaded = load_profile(str(p))
    assert loaded.decode_step_time(8, 1024) == pytest.approx(prof.decode_step_time(8, 1024))
    assert PerfProfile.coerce(loaded) is loaded
    with pytest.raises(ProfileError):
        load_profile(str(tmp_path / "missing.json"))
    with pytest.raises(ProfileError):
        PerfProfile.from_dict({"prefill": {"tokens": [1], "time_s": [1]}})
    bad = synthetic_profile()
    bad["decode"]["time_s"] = [[1.0]]
    with pytest.raises(ProfileError):
        PerfProfile.from_dict(bad)
