"""The mypyc-compiled hot path (`python -m tandem.compile`) simulates exactly what the source does."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from tandem.common.sampling import PRIORITIES, SamplingParams
from tandem.compile import status
from tandem.engine.request import Request
from tandem.engine.sim_engine import SIM_TOKEN, SimRequest, SimTokens, synthetic_prompt


def _fields(r) -> dict:
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(Request)}


@pytest.mark.parametrize("synthetic", [False, True])
def test_sim_request_sets_every_request_field_as_the_dataclass_does(synthetic):
    """`SimRequest.__init__` bypasses the dataclass `__init__`: every field must come out the same."""
    prompt = synthetic_prompt(5) if synthetic else [7, 8, 9]
    p = SamplingParams(max_tokens=4)
    sim = SimRequest("r", prompt, p, "batch", 2.5, None, True)
    ref = Request("r", list(prompt), p, "batch", arrival_time=2.5, hold_kv=True)
    got, want = _fields(sim), _fields(ref)
    if synthetic:       # a count instead of a copy of the prompt; reads the same
        assert isinstance(got.pop("all_token_ids"), SimTokens) and want.pop("all_token_ids") == [SIM_TOKEN] * 5
    assert got == want
    assert sim.rank == ref.rank == PRIORITIES.index("batch")
    with pytest.raises(ValueError):
        SimRequest("r", [1], p, "nope")


def _sim(tmp_path, name: str, pure: bool, argv: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, TANDEM_PURE_PYTHON="1" if pure else "0")
    r = subprocess.run([sys.executable, "-m", "tandem.sim", *argv, "--quiet", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert bool(rep["config"]["sim"]["compiled"]) != pure
    return rep


@pytest.mark.skipif(not any(status().values()), reason="not compiled here (python -m tandem.compile)")
@pytest.mark.parametrize("case", ["mooncake-disagg", "bursty-planner"])
def test_compiled_equals_source(case, traces_dir, profile_path, tmp_path):
    """Same seed, same report, request by request and decision by decision: prefix caching, KV
    transfer (Mooncake 2P2D), and the planner's flips, drains and migrations (bursty)."""
    if case == "mooncake-disagg":
        argv = ["--trace", str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"), "--duration", "40",
                "--max-isl", "8000", "--prefill", "2", "--decode", "2", "--profile", profile_path]
    else:
        argv = ["--workload", "bursty", "--rate", "10", "--duration", "60", "--prefill", "2", "--decode", "2",
                "--planner", "--slo-ttft-ms", "500", "--slo-tpot-ms", "40", "--profile", profile_path]
    a, b = _sim(tmp_path, "py", True, argv), _sim(tmp_path, "c", False, argv)
    assert a["summary"]["overall"]["requests_completed"] > 100
    assert a["summary"] == b["summary"]
    assert a["requests"] == b["requests"]
    assert a["timeline"] == b["timeline"]
    assert a["config"]["sim"]["planner_decisions"] == b["config"]["sim"]["planner_decisions"]
    if case == "bursty-planner":
        assert sum(d.get("action") == "flip" for d in a["config"]["sim"]["planner_decisions"]) >= 3


@pytest.mark.skipif(not any(status().values()), reason="not compiled here: the needs_source tests run as they are")
def test_needs_source_tests_pass_as_python():
    """Tests that monkeypatch a compiled module (marked `needs_source`) are skipped in a compiled run:
    run them here on the source."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "needs_source",
                        os.path.join(root, "tests")], env=dict(os.environ, TANDEM_PURE_PYTHON="1"), cwd=root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]
