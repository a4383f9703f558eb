"""Profile schema: round trip, interpolation, knee, mixed-step models (torch-free, CPU)."""
import json
import subprocess
import sys

import pytest

from tandem.profile.schema import Profile, find_knee, interp1


def make(**kw):
    d = dict(model="m", preset="tiny", device="H100", dtype="bfloat16", date="2026-11-23", command="x",
             block_size=16, kv_capacity_tokens=100000, max_num_batched_tokens=2048,
             prefill={"tokens": [128, 512, 2048], "time_s": [0.002, 0.005, 0.02]},
             prefill_ctx={"cached_tokens": [0, 4096], "new_tokens": 512, "time_s": [0.005, 0.007]},
             decode={"batch": [1, 8], "context": [1024, 4096], "time_s": [[0.006, 0.0062], [0.0065, 0.008]]},
             weight_load_s=3.0, worker_start_s=9.0, role_flip_s=None, kv_bytes_per_token=131072,
             copy_bandwidth_gbps=3000.0, matmul_tflops=790.0)
    d.update(kw)
    return d


def test_round_trip_keeps_exact_keys_and_extras(tmp_path):
    d = make(mixed_model="sum")
    p = Profile.from_dict(d)
    f = tmp_path / "p.json"
    p.save(f)
    back = json.loads(f.read_text())
    assert back == d
    assert Profile.load(f).extra == {"mixed_model": "sum"}


def test_interp_and_extrapolation():
    assert interp1([0, 10], [0, 1], 5) == 0.5
    assert interp1([0, 10], [0, 1], 20) == 2.0
    assert interp1([0, 10], [0, 1], -10) == -1.0
    assert interp1([3], [7], 100) == 7


def test_prefill_decode_times():
    p = Profile.from_dict(make())
    assert p.prefill_time(512) == pytest.approx(0.005)
    assert p.prefill_time(1280) == pytest.approx(0.0125)
    assert p.prefill_time(512, cached=4096) == pytest.approx(0.007)
    assert p.prefill_time(1024, cached=4096) == pytest.approx(p.prefill_time(1024) + 0.004)
    assert p.decode_time(1, 1024) == pytest.approx(0.006)
    assert p.decode_time(8, 4096) == pytest.approx(0.008)
    mid = p.decode_time(4.5, 2560)
    assert 0.006 < mid < 0.008
    assert p.decode_time(16, 4096) == pytest.approx(0.008 + (0.008 - 0.0062) / 7 * 8)   # extrapolated
    assert p.decode_time(0, 100) == 0.0 and p.prefill_time(0) == 0.0


def test_mixed_models_order():
    p = Profile.from_dict(make())
    s = p.mixed_step_time(512, 0, 8, 2048, model="sum")
    m = p.mixed_step_time(512, 0, 8, 2048, model="max")
    sh = p.mixed_step_time(512, 0, 8, 2048, model="shared")
    assert m <= sh <= s
    assert p.mixed_step_time(0, 0, 8, 2048) == p.decode_time(8, 2048)
    assert p.mixed_step_time(512, 0, 0, 0) == p.prefill_time(512)
    q = Profile.from_dict(make(mixed_model="max"))
    assert q.mixed_step_time(512, 0, 8, 2048) == m


def test_knee():
    toks = [128, 256, 512, 1024, 2048, 4096]
    times = [t / r for t, r in zip(toks, [10e3, 20e3, 35e3, 45e3, 48e3, 47e3])]
    assert find_knee(toks, times) == 1024


def test_validation():
    with pytest.raises(ValueError):
        Profile.from_dict(make(decode={"batch": [1, 8], "context": [1024], "time_s": [[1.0]]}))
    with pytest.raises(ValueError):
        Profile.from_dict({"model": "x"})


def test_schema_is_torch_free():
    code = "import sys, tandem.profile, tandem.profile.schema, tandem.profile.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_committed_profiles_load():
    from pathlib import Path
    for f in sorted((Path(__file__).resolve().parents[2] / "profiles").glob("*.json")):
        p = Profile.load(f)
        assert p.decode_time(1, 1024) > 0 and p.prefill_time(2048) > 0
        assert p.max_num_batched_tokens in p.prefill["tokens"]
