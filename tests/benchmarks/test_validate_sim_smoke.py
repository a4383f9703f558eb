"""benchmarks/validate_sim.sh end to end on CPU (tiny model, two small slices, the checked-in profile),
so the one-call GPU validation of issue 7 does not rot: serve + bench per slice, GC logs of the server's
processes, calibration on the first slice, held-out sims, tables."""
import json
import os
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "traces" / "azure2023_conv_181546-184500.csv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not TRACE.exists(), reason="Azure conv trace not present")
def test_validate_sim_smoke(tmp_path, llama_dir):
    env = dict(os.environ, SKIP_WHEELS="1", OUT=str(tmp_path), DEVICE="cpu", MODEL=llama_dir, PRESET="tiny",
               N="12", SCALE="0.5", MAX_ISL="200", MAX_OSL="24", N_WARMUP="4", SLICES="A:0 B:600",
               TRACE=str(TRACE), PORT=str(_free_port()), PROFILE="profiles/h100_llama-3.2-1b.json")
    r = subprocess.run(["bash", "benchmarks/validate_sim.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with tarfile.open(tmp_path / "raw.tgz") as tf:                   # the script packs the raw reports
        tf.extractall(tmp_path, filter="data")
    md = (tmp_path / "validation.md").read_text()
    assert "calibration slice" in md and "HELD-OUT slice" in md and md.count("| TTFT p90 ms |") == 4
    sv = json.loads((tmp_path / "profile_cal.json").read_text())["serving_overhead"]
    assert min(sv["step_s"], sv["seq_s"], sv["request_s"]) >= 0 and "calibrate" in sv["source"]
    for s in ("A", "B"):
        real, sim = (json.loads((tmp_path / f"{k}_{s}.json").read_text()) for k in ("real", "sim"))
        assert real["summary"]["overall"]["requests_completed"] == 12
        assert [q["isl"] for q in real["requests"]] == [q["isl"] for q in sim["requests"]]   # same requests
    logs = [json.loads(p.read_text()) for p in (tmp_path / "gc").glob("gc_*.json")]
    assert any("worker" in " ".join(g["argv"]) for g in logs)       # the worker process logged its GC
    assert "worker gen-2" in r.stdout
    probes = [json.loads(line)["label"] for line in (tmp_path / "host.jsonl").read_text().splitlines()]
    assert probes == ["start", "before-A", "before-B"] and "host before-B: python" in r.stdout
