"""`tandem bench` against a live `tandem serve` (tiny model, CPU) for a short trace slice.

Skips until the server exists (tandem.frontend with its modules, and `tandem.cli serve`).
The server runs in a subprocess on a free port; the test always stops what it started.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _server_available() -> bool:
    try:
        spec = importlib.util.find_spec("tandem.frontend")
        cli = importlib.util.find_spec("tandem.cli")
    except (ImportError, ValueError):
        return False
    # a namespace package (an empty directory) has no origin: the frontend is not there yet
    return spec is not None and spec.origin is not None and cli is not None


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.skipif(not _server_available(), reason="tandem serve is not available yet")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--port", str(port)],
                            cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"tandem serve exited with {proc.returncode}; log: {open(log.name).read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > t_end:
                pytest.fail(f"tandem serve not healthy after 240 s; log: {open(log.name).read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_trace_slice_against_tandem_serve(live_server, traces_dir, tmp_path, consistent):
    from tandem.bench.cli import build_parser, run
    out, plots = tmp_path / "live.json", tmp_path / "plots"
    args = build_parser().parse_args([
        "--url", live_server, "--trace", str(traces_dir / "azure2023_conv_181546-184500.csv"),
        "--max-requests", "20", "--time-scale", "0.05", "--max-isl", "48", "--max-osl", "12",
        "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500", "--gpu-hour-usd", "2.0", "--gpus", "1",
        "--request-timeout", "120", "--out", str(out), "--plot", str(plots), "--no-progress"])
    assert run(args) == 0
    rep = json.loads(out.read_text())
    consistent(rep)
    over = rep["summary"]["overall"]
    assert over["requests_total"] == 20
    assert over["requests_completed"] == 20, over["errors"]
    assert rep["config"]["model"]
    for r in rep["requests"]:
        # token-id prompts: the server counted exactly the ISL we sent; ignore_eos forced the OSL
        assert r["prompt_tokens"] == r["isl"]
        assert r["output_tokens"] == r["osl_requested"]
    assert over["cost_per_mtok_usd"] > 0
    for name in ("latency_cdf.png", "timeline.png"):
        assert (plots / name).stat().st_size > 10_000


def test_mooncake_prefixes_hit_the_prefix_cache(live_server, traces_dir, tmp_path, consistent):
    from tandem.bench.cli import build_parser, run
    out = tmp_path / "moon.json"
    args = build_parser().parse_args([
        "--url", live_server, "--trace", str(traces_dir / "mooncake_fast25_conversation_0-30min.jsonl"),
        "--max-requests", "12", "--time-scale", "0.05", "--max-isl", "1100", "--max-osl", "4",
        "--request-timeout", "120", "--out", str(out), "--no-progress", "--quiet"])
    assert run(args) == 0
    rep = json.loads(out.read_text())
    consistent(rep)
    over = rep["summary"]["overall"]
    assert over["requests_completed"] == 12, over["errors"]
    # all 12 rows start with hash id 0: once the first is in the cache, later ones reuse 512 tokens
    if over["prefix_cache_hit_rate"] is not None:
        assert over["prefix_cache_hit_rate"] > 0
        assert max(r["cached_tokens"] or 0 for r in rep["requests"]) >= 512
