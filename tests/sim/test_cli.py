"""`tandem sim` on slices of the shared traces, and the throughput smoke test."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.sim.cli import main


def test_cli_on_azure_slice_with_plots(traces_dir, profile_path, tmp_path):
    out, plots = tmp_path / "conv.json", tmp_path / "plots"
    rc = main(["--trace", str(traces_dir / "azure2023_conv_181546-184500.csv"), "--duration", "60",
               "--gpus", "2", "--profile", profile_path, "--slo-ttft-ms", "500", "--slo-tpot-ms", "50",
               "--gpu-hour-usd", "3", "--out", str(out), "--plot", str(plots), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    o = rep["summary"]["overall"]
    assert o["requests_completed"] == rep["config"]["plan"]["_all"]["requests"] > 100
    assert rep["config"]["tool"] == "tandem sim" and rep["config"]["source"].startswith("trace:azure2023_conv")
    assert rep["config"]["sim"]["engine"]["prefix_caching"] is False       # no hash ids in Azure
    assert (plots / "latency_cdf.png").stat().st_size > 0 and (plots / "timeline.png").stat().st_size > 0
    assert o["slo_attainment"] is not None and o["cost_per_mtok_usd"] is not None


def test_cli_on_mooncake_slice_disaggregated(traces_dir, profile_path, tmp_path):
    out = tmp_path / "mc.json"
    rc = main(["--trace", str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"), "--duration", "60",
               "--max-isl", "8000", "--prefill", "2", "--decode", "2", "--profile", profile_path,
               "--out", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["config"]["sim"]["engine"]["prefix_caching"] is True
    assert rep["config"]["jitter_s"][0] > 0                 # quantized Mooncake arrivals: auto jitter
    assert rep["summary"]["overall"]["requests_failed"] == 0
    assert sum(r["cached_tokens"] or 0 for r in rep["requests"]) > 0    # shared prefixes hit
    assert rep["config"]["sim"]["kv_leaks"] == {}


def test_cli_replicate_and_two_traces_as_classes(traces_dir, profile_path, tmp_path):
    out = tmp_path / "two.json"
    conv = traces_dir / "azure2023_conv_181546-184500.csv"
    code = traces_dir / "azure2023_code_181703-184500.csv"
    rc = main(["--trace", f"{conv}#chat:interactive", "--trace", f"{code}#coding:batch", "--duration", "30",
               "--replicate", "3", "--gpus", "4", "--profile", profile_path, "--out", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    plan = rep["config"]["plan"]
    assert set(rep["summary"]) == {"overall", "chat", "coding"}
    assert rep["config"]["replicate"] == 3 and plan["_all"]["requests"] % 3 == 0


def test_cli_bad_input(profile_path, tmp_path):
    out = str(tmp_path / "x.json")
    assert main(["--workload", "chat", "--profile", "/nope.json", "--gpus", "1", "--out", out, "--quiet"]) == 2
    assert main(["--trace", "/nope.csv", "--profile", profile_path, "--gpus", "1", "--out", out, "--quiet"]) == 2
    assert main(["--workload", "chat", "--profile", profile_path, "--out", out, "--quiet"]) == 2   # no --gpus
    assert main(["--workload", "chat", "--profile", profile_path, "--gpus", "2", "--prefill", "2",
                 "--decode", "1", "--out", out, "--quiet"]) == 2


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tandem.sim", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--profile" in r.stdout and "--router-mode" in r.stdout


def test_throughput_smoke_8_gpus(traces_dir, tmp_path):
    """8 GPUs kept busy (the conversation trace x13, ~50-70 req/s, most of their capacity with the
    synthetic 8B profile) for 2 minutes of virtual time: a few seconds of CPU."""
    out = tmp_path / "g8.json"
    rc = main(["--trace", str(traces_dir / "azure2023_conv_181546-184500.csv"), "--replicate", "13",
               "--duration", "120", "--gpus", "8", "--profile", "synthetic:8b", "--out", str(out),
               "--quiet", "--records", "none"])
    assert rc == 0
    rep = json.loads(out.read_text())
    sim = rep["config"]["sim"]
    o = rep["summary"]["overall"]
    assert o["requests_completed"] > 5000 and o["requests_failed"] == 0
    busy = [e["busy_frac"] for e in rep["timeline"][5:-5] if e.get("busy_frac") is not None]
    assert sum(busy) / len(busy) > 0.8
    assert sim["virtual_s"] > 120
    assert sim["cpu_s"] < 30, sim                  # ~3 s on an idle core
    assert sim["speedup_cpu"] > 4


def test_a_bench_command_line_runs_as_is(profile_path, tmp_path):
    """Validation is one command: the bench's flags (client-only ones are ignored), plus the
    cluster's. --max-concurrency is modelled as the bench's client does it (dispatch lag)."""
    out = tmp_path / "b.json"
    rc = main(["--url", "http://127.0.0.1:8000", "--model", "m", "--endpoint", "completions",
               "--workload", "chat", "--rate", "40", "--duration", "10", "--max-concurrency", "4",
               "--ignore-eos", "--prompt-mode", "ids", "--no-cluster-poll", "--seed", "1",
               "--gpus", "1", "--profile", profile_path, "--out", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["config"]["max_concurrency"] == 4
    reqs = rep["requests"]
    assert max(r["dispatch_lag_s"] for r in reqs) > 0.1
    # never more than 4 in flight: sends (arrival + lag) vs ends (send + e2e)
    ev = sorted([(r["arrival_s"] + r["dispatch_lag_s"], 1) for r in reqs] +
                [(r["arrival_s"] + r["dispatch_lag_s"] + r["e2e_s"] - 1e-5, -1) for r in reqs],   # us rounding
                key=lambda x: (x[0], x[1]))
    live = peak = 0
    for _, d in ev:
        live += d
        peak = max(peak, live)
    assert peak <= 4
    assert rep["summary"]["overall"]["requests_completed"] == len(reqs)


def test_calibration_recovers_known_overheads(profile_path, tmp_path):
    """A 'real' report made by the simulator with known serving overheads: the step-timeline method
    measures all four again, and the profile it writes reproduces the run with no flags."""
    from tandem.sim.calibrate import main as cal
    real = tmp_path / "real.json"
    load = ["--workload", "chat", "--rate", "3", "--duration", "30", "--seed", "2", "--gpus", "1",
            "--profile", profile_path]
    assert main([*load, "--step-overhead-ms", "1.5", "--seq-overhead-ms", "0.2", "--new-overhead-ms", "3",
                 "--new-overhead-per", "prefill_step", "--request-overhead-ms", "4", "--out", str(real),
                 "--quiet"]) == 0
    out, prof = tmp_path / "cal.json", tmp_path / "prof.json"
    assert cal(["--real", str(real), *load, "--out", str(out), "--write-profile", str(prof)]) == 0
    fit = json.loads(out.read_text())["config"]["sim"]["calibration"]["fit"]
    assert fit["step_s"] == pytest.approx(1.5e-3, rel=0.05)
    assert fit["seq_s"] == pytest.approx(0.2e-3, rel=0.05)
    assert fit["new_s"] == pytest.approx(3e-3, rel=0.05)
    assert fit["new_q"][0] == pytest.approx(3e-3, rel=0.05) and fit["new_q"][-1] == pytest.approx(3e-3, rel=0.05)
    assert fit["request_s"] == pytest.approx(4e-3, rel=0.05)
    assert json.loads(prof.read_text())["serving_overhead"]["new_per"] == "prefill_step"
    again = tmp_path / "again.json"
    load[-1] = str(prof)
    assert main([*load, "--out", str(again), "--quiet"]) == 0
    a, b = (json.loads(p.read_text())["summary"]["overall"] for p in (real, again))
    for k in ("ttft_ms", "tpot_ms"):
        assert b[k]["p90"] == pytest.approx(a[k]["p90"], rel=0.02)
    assert json.loads(again.read_text())["config"]["sim"]["overheads_from"]["seq_ms"] == "profile"


def test_calibration_p50_method(profile_path, tmp_path):
    """The earlier method (constant step overhead, medians matched) still runs."""
    from tandem.sim.calibrate import main as cal
    real = tmp_path / "real.json"
    load = ["--workload", "chat", "--rate", "3", "--duration", "30", "--seed", "2", "--gpus", "1",
            "--profile", profile_path]
    assert main([*load, "--step-overhead-ms", "3", "--request-overhead-ms", "4", "--out", str(real),
                 "--quiet"]) == 0
    out = tmp_path / "cal.json"
    assert cal(["--real", str(real), "--method", "p50", *load, "--out", str(out)]) == 0
    hist = json.loads(out.read_text())["config"]["sim"]["calibration"]["history"]
    last = hist[-1]
    assert last["step_overhead_ms"] == pytest.approx(3.0, abs=0.4)
    assert last["request_overhead_ms"] == pytest.approx(4.0, abs=1.5)


def test_step_timeline_survives_receive_jitter(profile_path, tmp_path):
    """Client receive times are not step-exact: with up to 0.15 ms of jitter on every chunk the step
    clusters, and so the measured overheads, stay put."""
    import random

    from tandem.sim.calibrate import fit_step_overheads, step_samples
    from tandem.sim.profile import SimProfile
    real = tmp_path / "real.json"
    assert main(["--workload", "chat", "--rate", "4", "--duration", "20", "--seed", "3", "--gpus", "1",
                 "--profile", profile_path, "--step-overhead-ms", "1", "--seq-overhead-ms", "0.3",
                 "--new-overhead-ms", "2", "--out", str(real), "--quiet"]) == 0
    rep = json.loads(real.read_text())
    rng = random.Random(0)
    for r in rep["requests"]:
        r["token_times_s"] = [t + rng.uniform(0, 1.5e-4) for t in r["token_times_s"]]
    fit = fit_step_overheads(step_samples(rep, SimProfile.load(profile_path)))
    assert fit["step_s"] == pytest.approx(1e-3, abs=2e-4)
    assert fit["seq_s"] == pytest.approx(3e-4, rel=0.1)
    assert fit["new_s"] == pytest.approx(2e-3, rel=0.15)
