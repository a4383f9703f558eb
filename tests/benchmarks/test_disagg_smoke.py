"""benchmarks/disagg.py --smoke: the issue #6 GPU script end to end on CPU (tiny model, two CPU
"devices"), so the one-call GPU run does not rot: peer copy between two processes through a shared
handle, the transfer layer between a prefill and a decode engine in two processes (bitwise checked),
and 1P1D vs aggregated `tandem serve` with the same `tandem bench` requests and the goal table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_disagg_smoke(tmp_path, llama_dir):
    r = subprocess.run([sys.executable, "benchmarks/disagg.py", "--smoke", "--out", str(tmp_path), "--model", llama_dir],
                       cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads((tmp_path / "disagg.json").read_text())
    assert res["peer"]["ipc_bitwise"] and res["peer"]["ipc_gbps"] > 0
    for t in res["transfer"]["results"]:
        assert t["fetched_bitwise"] and t["imported_bitwise"] and t["all_imported"]
        assert t["bytes"] == t["tokens"] * 4 * 2 * 2 * 32 * 4      # tiny: 4 layers, K+V, 2 kv heads x 32 dims, fp32
        assert t["ratio_vs_ipc_peer_copy"] > 0
    rows = res["serve"]["table"]["rows"]
    assert set(rows) == {"disagg_1p1d_mixed_one", "disagg_1p1d_chat_alone_one", "agg_2w_mixed_one"}
    for name, row in rows.items():
        assert row["failed_total"] == 0 and row["chat_completed"] > 0, name
        assert row["chat_tpot_p99_ms"] > 0 and row["chat_goodput_per_gpu"] > 0
    mixed_d, mixed_a = (res["serve"]["runs"][k]["summary"] for k in ("disagg_1p1d_mixed_one", "agg_2w_mixed_one"))
    assert mixed_d["overall"]["requests_total"] == mixed_a["overall"]["requests_total"]     # same requests
    # the 1P1D run really handed KV over, the aggregated one never did
    totals = res["serve"]["runs"]["disagg_1p1d_mixed_one"]["cluster_totals"]
    assert totals["kv_handoffs"] > 0
    assert res["serve"]["runs"]["agg_2w_mixed_one"]["cluster_totals"]["kv_handoffs"] == 0
    goals = res["serve"]["table"]["goals"]
    assert set(goals) == {"goodput_ratio_disagg_vs_agg_one", "chat_tpot_p99_one_vs_alone"}
    assert "goal: goodput_ratio_disagg_vs_agg_one" in r.stdout
