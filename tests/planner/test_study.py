"""The study machinery end to end on a tiny configuration (seconds): static sweep in subprocesses,
the planner and the Dynamo-like baseline from the best split, the table, the plots."""
import json
import os

import pytest

pytest.importorskip("tandem.sim.run")
pytest.importorskip("matplotlib")

from tandem.planner import study as st  # noqa: E402


def test_tiny_study_runs_and_reports(tmp_path, monkeypatch):
    # 3 GPUs, 40 s of the bursty workload at a low rate, measured profile
    monkeypatch.setitem(st.WORKLOADS, "bursty", {**st.WORKLOADS["bursty"], "rate_per_gpu": 1.0})
    res = st.study(3, ["bursty"], jobs=2, durations={"bursty": 40.0},
                   policies=["planner", "planner-scale", "dynamo"], timeout_s=120)
    assert {r["policy"] for r in res} == {"static", "planner", "planner-scale", "dynamo"}
    assert all(r["ok"] for r in res), [r.get("error") for r in res]
    static = [r for r in res if r["policy"] == "static"]
    assert sorted(r["prefill"] for r in static) == [1, 2]
    best = st.best_static(res)
    for r in res:
        assert r["requests"] > 50 and r["completed"] + r["failed"] == r["requests"]
        assert 0.0 <= r["slo_attainment"] <= 1.0 and r["gpu_hours"] > 0
        assert not r["kv_leaks"]
        if r["policy"] != "static":
            assert r["prefill"] == best["prefill"]      # dynamic policies start from the best split
    # a scaling policy in service on fewer GPUs than the budget uses fewer GPU-hours
    fixed = next(r for r in res if r["policy"] == "planner")
    scale = next(r for r in res if r["policy"] == "planner-scale")
    assert scale["gpu_hours"] <= fixed["gpu_hours"] * 1.001
    # report: table rows for every policy, summary JSON round trip, plots written
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"gpus": 3, "results": res}))
    assert st.main(["report", str(f), "--img", str(tmp_path / "img"),
                    "--md", str(tmp_path / "t.md")]) == 0
    md = (tmp_path / "t.md").read_text()
    for name in ("best static", "planner", "planner-scale", "dynamo"):
        assert f"| {name} |" in md
    pngs = sorted(os.listdir(tmp_path / "img"))
    assert "planner_study_bars.png" in pngs and any("timeline" in p for p in pngs)
