"""benchmarks/sim_replay.py: a report replayed as run (arrivals as sent, prefill work less cache hits),
calibrated on the first report and checked on the others, on CPU in seconds."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmarks_sim_replay", ROOT / "benchmarks" / "sim_replay.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)


def test_as_run_rows_use_send_times_and_cache_hits():
    rep = {"requests": [
        {"status": "ok", "arrival_s": 1.0, "dispatch_lag_s": 0.5, "isl": 300, "cached_tokens": 256, "output_tokens": 7},
        {"status": "ok", "arrival_s": 1.2, "dispatch_lag_s": 0.0, "isl": 50, "cached_tokens": 0, "output_tokens": 3},
        {"status": "error", "arrival_s": 0.1, "isl": 10, "output_tokens": 0}]}
    rows = replay.as_run_rows(rep)
    assert rows == [{"timestamp": 0.0, "input_length": 50, "output_length": 3},
                    {"timestamp": 300.0, "input_length": 44, "output_length": 7}]


def test_replay_of_simulated_runs_is_within_tolerance(tmp_path, capsys):
    """Reports made by the simulator itself (known overheads) replay within 15% on every row."""
    from tandem.sim.cli import main as sim
    prof = ROOT / "profiles" / "h100_llama-3.2-1b.json"
    reals = []
    for name, rate in (("A", 6), ("B", 9)):
        out = tmp_path / f"real_{name}.json"
        assert sim(["--workload", "chat", "--rate", str(rate), "--duration", "20", "--seed", str(rate), "--gpus", "1",
                    "--profile", str(prof), "--step-overhead-ms", "0.1", "--seq-overhead-ms", "0.01",
                    "--new-overhead-ms", "1", "--request-overhead-ms", "5", "--out", str(out), "--quiet"]) == 0
        reals.append(str(out))
    assert replay.main(["--profile", str(prof), "--out", str(tmp_path / "r"), *reals]) == 0
    text = capsys.readouterr().out
    assert "### B as run (held out" in text and "held-out reports all within 15%: YES" in text
    assert json.loads((tmp_path / "r" / "profile_cal.json").read_text())["serving_overhead"]["request_s"] > 0
