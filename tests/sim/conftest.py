"""Fixtures for the simulator tests.

`SYNTHETIC_PROFILE` is a SYNTHETIC perf profile: hand-picked numbers with the shape of a
`tandem profile` JSON, NOT a measurement of any GPU. Decode step = 5 ms + 0.1 ms per sequence +
10 ns per sequence-token of context; prefill = 4 ms + ~31 us per token; a small KV cache (2,000
blocks of 16 tokens) so that preemption is easy to provoke.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def _decode(b: float, c: float) -> float:
    return 0.005 + 0.0001 * b + 1e-8 * b * c


SYNTHETIC_PROFILE = {
    "model": "synthetic-test-model", "preset": None, "device": "synthetic (not measured)",
    "dtype": "bfloat16", "date": None, "synthetic": True,
    "command": "tests/sim/conftest.py (hand-made numbers)",
    "block_size": 16, "kv_capacity_tokens": 16 * 2000, "max_num_batched_tokens": 512,
    "prefill": {"tokens": [1, 64, 256, 512, 1024], "time_s": [0.004, 0.006, 0.012, 0.020, 0.036]},
    "prefill_ctx": {"cached_tokens": [0, 1024, 4096], "new_tokens": 256, "time_s": [0.012, 0.014, 0.020]},
    "decode": {"batch": [1, 8, 32, 128], "context": [128, 1024, 4096],
               "time_s": [[_decode(b, c) for c in (128, 1024, 4096)] for b in (1, 8, 32, 128)]},
    "weight_load_s": 1.0, "worker_start_s": 5.0, "role_flip_s": 0.25,
    "kv_bytes_per_token": 131072, "copy_bandwidth_gbps": 100.0, "matmul_tflops": 300.0,
}


@pytest.fixture
def profile_dict():
    return copy.deepcopy(SYNTHETIC_PROFILE)


@pytest.fixture
def profile_path(tmp_path):
    import json
    p = tmp_path / "synthetic_profile.json"
    p.write_text(json.dumps(SYNTHETIC_PROFILE))
    return str(p)


@pytest.fixture
def traces_dir():
    if not TRACES.is_dir():
        pytest.skip(f"traces not found at {TRACES}")
    return TRACES
