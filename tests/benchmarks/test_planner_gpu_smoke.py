"""benchmarks/planner_gpu.py: the flip-timing analysis on constructed events, and the --smoke run end to end
on CPU (tiny model, two CPU workers, a measured CPU profile), so the one-call GPU run does not rot."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmarks_planner_gpu", ROOT / "benchmarks" / "planner_gpu.py")
_pg = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pg)
analyze, lost_requests, swing_times = _pg.analyze, _pg.lost_requests, _pg.swing_times


def test_swing_times():
    assert swing_times(100, 40, 0.5) == [(0, "on"), (20.0, "off"), (40, "on"), (60.0, "off"), (80, "on")]


def test_analyze_lines_flips_up_with_swings():
    t0 = 1000.0
    swings = swing_times(80, 40, 0.5)
    decisions = [{"time": t0 + 1.2, "action": "flip", "worker_id": "w0", "from_role": "prefill", "to_role": "decode"},
                 {"time": t0 + 5.0, "action": "hold", "worker_id": None},
                 {"time": t0 + 21.5, "action": "flip", "worker_id": "w1", "from_role": "decode", "to_role": "prefill"}]
    worker_flips = [{"worker": "w0", "to": "decode", "at": t0 + 1.21, "flip_s": 0.001, "drain_s": 0.4},
                    {"worker": "w1", "to": "prefill", "at": t0 + 21.52, "flip_s": 0.02, "drain_s": None}]
    seen = [{"worker": "w0", "role": "prefill", "t": t0}, {"worker": "w0", "role": "decode", "t": t0 + 1.5},
            {"worker": "w1", "role": "prefill", "t": t0 + 21.7}]
    r = analyze(t0, swings, decisions, worker_flips, seen)
    a, b = r["flips"]
    assert (a["swing_t"], a["phase"], a["swing_to_decision_s"]) == (0.0, "on", 1.2)
    assert abs(a["decision_to_done_s"] - 0.41) < 1e-6 and abs(a["swing_to_done_s"] - 1.61) < 1e-6
    assert abs(a["decision_to_seen_s"] - 0.3) < 1e-6
    assert b["swing_t"] == 20.0 and abs(b["decision_to_done_s"] - 0.04) < 1e-6      # no drain yet: SetRole time
    assert r["swings_answered"] == 2 and [s["answered"] for s in r["swings"]] == [True, True, False, False]
    assert r["goal_swing_to_done_met"] and r["goal_flip_met"]
    assert analyze(t0, swings, decisions[1:2], [], [])["goal_flip_met"] is False       # no flip: not met


def test_lost_requests():
    reqs = [{"status": "ok", "output_tokens": 5, "osl_requested": 5}, {"status": "ok", "output_tokens": 3,
            "osl_requested": 5}, {"status": "error", "error_kind": "timeout", "osl_requested": 5}]
    assert lost_requests({"requests": reqs}) == {"sent": 3, "failed": 1, "short": 1, "errors": ["timeout"]}


def test_planner_gpu_smoke(tmp_path, llama_dir):
    r = subprocess.run([sys.executable, "benchmarks/planner_gpu.py", "--smoke", "--out", str(tmp_path),
                        "--model", llama_dir, "--runs", "planner,static_1p1d,static_spill,planner_spill"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads((tmp_path / "planner.json").read_text())
    assert res["lost"] == {"sent": res["requests"], "failed": 0, "short": 0, "errors": []}
    for name in ("planner", "static_1p1d", "static_spill", "planner_spill"):
        assert res[f"summary_{name}"]["overall"]["requests_completed"] == res["requests"]
    # serve applied spill mode to the planner of the spill run only (SPILL_PLANNER)
    assert res["planner_config_planner_spill"]["spill_flip_delay_s"] == 30.0
    assert res["planner_config_planner_spill"]["hedge_window_s"] == 0.0
    assert res["planner_config_planner"]["spill_flip_delay_s"] == 0.0
    assert res["polls"]["polls"] > 20 and res["goodput_ratio_planner_vs_static"] > 0
    assert len(res["flips"]["swings"]) == 4
    for f in res["flips"]["flips"]:             # whatever flips the planner made are fully timed
        assert f["decision_to_done_s"] is not None and f["decision_to_done_s"] >= 0
    assert "goodput/GPU planner / static 1P1D" in r.stdout and "| static_spill |" in r.stdout
