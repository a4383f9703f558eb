"""benchmarks/host_probe.py: the host-speed record validate_sim.sh writes before the profile and each slice."""
from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("benchmarks_host_probe",
                                               os.path.join(ROOT, "benchmarks", "host_probe.py"))
host_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_probe)


def test_probe_on_cpu_appends_a_record(tmp_path, capsys):
    out = tmp_path / "host.jsonl"
    for label in ("start", "before-A"):
        assert host_probe.main(["--label", label, "--append", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in recs] == ["start", "before-A"]
    for r in recs:
        assert r["device"] == "cpu" and "gpu" not in r and "triton_launch_us" not in r
        assert r["python_us"] > 0 and r["torch_launch_us"] > 0 and r["cpu"]["cpus"] >= 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("host before-A: python ") and "torch launch" in lines[1]
