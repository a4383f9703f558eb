"""End to end: `tandem bench` against a FastAPI+uvicorn OpenAI-compatible stub in a subprocess."""
import json
from pathlib import Path

import pytest

from tandem.bench.cli import build_parser, run


def bench(*argv) -> int:
    return run(build_parser().parse_args([str(a) for a in argv]))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stub(module_servers, tmp_path_factory, stub_args):
    log = tmp_path_factory.mktemp("stub") / "requests.jsonl"
    url = module_servers.start(stub_args["fastapi"](log=str(log)))
    return url, log


def test_workload_run_json_plots_consistent(stub, tmp_path, consistent):
    url, log = stub
    n0 = len(read_log(log)) if log.exists() else 0
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    rc = bench("--url", url, "--workload", "mixed", "--rate", 25, "--duration", 2, "--max-isl", 64,
               "--max-osl", 8, "--slo-ttft-ms", 30, "--slo-tpot-ms", 5, "--gpus", 2,
               "--gpu-hour-usd", 2.5, "--out", out, "--plot", plots, "--no-progress", "--seed", 7)
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep) >= {"config", "summary", "requests", "timeline"}
    over = rep["summary"]["overall"]
    for k in ("requests_completed", "requests_failed", "duration_s", "request_throughput",
              "output_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput",
              "slo_attainment", "gpu_hours", "cost_per_mtok_usd"):
        assert k in over
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(over[k]) == {"mean", "p50", "p90", "p99"}
    assert over["requests_failed"] == 0 and over["requests_completed"] == len(rep["requests"]) > 20
    assert set(rep["summary"]) == {"overall", "chat", "summarize"}
    assert rep["config"]["model"] == "stub-model" and rep["config"]["server_is_tandem"] is False
    assert over["gpu_hours"] == pytest.approx(2 * over["duration_s"] / 3600)
    assert over["cost_per_mtok_usd"] > 0 and over["goodput_per_gpu"] == pytest.approx(over["goodput"] / 2)
    # stub timing: TTFT >= 8 ms, ITL >= 3 ms
    assert over["ttft_ms"]["p50"] >= 8 and over["itl_ms"]["p50"] >= 3
    for r in rep["requests"]:
        assert r["status"] == "ok"
        assert r["output_tokens"] == r["osl_requested"] == len(r["token_times_s"])
        assert r["prompt_tokens"] == r["isl"]                      # exact ISL, as the server counted it
        assert r["ttft_s"] == r["token_times_s"][0] and r["e2e_s"] >= r["token_times_s"][-1]
    consistent(rep)
    for name in ("latency_cdf.png", "timeline.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # what the server saw: token-id prompts, forced lengths, usage asked, no Tandem-only field
    seen = read_log(log)[n0:]
    probe, main = seen[0], seen[1:]
    assert probe["max_tokens"] == 2
    assert len(main) == len(rep["requests"])
    for s in main:
        assert s["prompt_is_ids"] and s["stream"] is True and s["include_usage"] is True
        assert s["ignore_eos"] is True and s["min_tokens"] == s["max_tokens"]
        assert "priority" not in s["keys"]
    assert sorted(s["prompt_len"] for s in main) == sorted(r["isl"] for r in rep["requests"])


def test_mooncake_slice_shares_prefixes_on_the_wire(stub, traces_dir, tmp_path, consistent):
    url, log = stub
    n0 = len(read_log(log))
    out = tmp_path / "m.json"
    rc = bench("--url", url, "--trace", traces_dir / "mooncake_fast25_conversation_0-30min.jsonl",
               "--max-requests", 12, "--time-scale", 0.02, "--max-isl", 1500, "--max-osl", 4,
               "--out", out, "--no-progress", "--no-probe", "--send-priority", "--priority-format", "int")
    assert rc == 0
    rep = json.loads(out.read_text())
    consistent(rep)
    assert rep["config"]["jitter_s"] == [pytest.approx(3.0, abs=0.01)]
    seen = read_log(log)[n0:]
    assert len(seen) == 12
    assert all(s["priority"] == 0 for s in seen)               # interactive -> 0 in vLLM's format
    # the first 12 rows all start with hash id 0: the first 512 tokens are the same on the wire
    heads = {tuple(s["prompt_head"][:512]) for s in seen}
    assert len(heads) == 1
    assert len({tuple(s["prompt_head"][512:1024]) for s in seen}) > 1


def test_chat_endpoint_text_prompts(stub, tmp_path, consistent):
    url, _ = stub
    out = tmp_path / "c.json"
    rc = bench("--url", url, "--workload", "chat", "--rate", 20, "--max-requests", 10, "--endpoint", "chat",
               "--max-isl", 50, "--max-osl", 6, "--out", out, "--no-progress")
    assert rc == 0
    rep = json.loads(out.read_text())
    consistent(rep)
    assert rep["config"]["prompt_mode"] == "text"
    for r in rep["requests"]:
        # the role-only first chunk is not an output token
        assert len(r["token_times_s"]) == r["output_tokens"] == r["osl_requested"]
        assert r["ttft_s"] >= 0.008
        assert r["prompt_tokens"] == r["isl"]            # words ~ tokens without a tokenizer


def test_errors_counted_by_kind_and_cluster_timeline(servers, tmp_path, consistent, stub_args):
    url = servers.start(stub_args["fastapi"](fail_every=4, cluster=True))
    out, plots = tmp_path / "e.json", tmp_path / "p"
    rc = bench("--url", url, "--workload", "summarize", "--rate", 20, "--max-requests", 24,
               "--max-isl", 32, "--max-osl", 4, "--out", out, "--plot", plots, "--no-progress",
               "--no-probe", "--poll-interval", 0.2, "--gpu-hour-usd", 1.0,
               "--slo", "summarize:1000:-")
    assert rc == 0
    rep = json.loads(out.read_text())
    consistent(rep)
    over = rep["summary"]["overall"]
    assert over["errors"] == {"http_500": 6} and over["requests_failed"] == 6
    assert over["slo_attainment"] == pytest.approx(18 / 24)
    # /v1/cluster answered: Tandem detected, priority names sent, pools and GPU count on the timeline
    assert rep["config"]["server_is_tandem"] is True and rep["config"]["send_priority"] is True
    assert any(e.get("pools") for e in rep["timeline"])
    assert all(e["num_gpus"] in (2.0, 3.0) for e in rep["timeline"] if "num_gpus" in e)
    assert rep["config"]["gpu_hours_source"] == "timeline"
    assert over["gpu_hours"] > 0 and over["cost_per_mtok_usd"] > 0
    assert (plots / "timeline.png").stat().st_size > 10_000


def test_probe_rejection_is_a_clear_error(servers, tmp_path, capsys, stub_args):
    url = servers.start(stub_args["fastapi"](fail_every=1))
    rc = bench("--url", url, "--workload", "chat", "--max-requests", 3, "--out", tmp_path / "x.json",
               "--no-progress")
    assert rc == 3
    err = capsys.readouterr().err
    assert "test request" in err and "http_500" in err
    assert not (tmp_path / "x.json").exists()
