"""Client overhead: 200 streamed requests/s against a stub in another process, on schedule.

The stub (tandem.bench.stub, plain asyncio) runs in its own process so it does not share the
client's GIL. Each request streams 16 one-token chunks (5 ms to the first, 2 ms apart), so the
client handles ~3,400 SSE events/s. The measured numbers are printed (run with -s to see them)
and attached to the test report as properties.
"""
import json
import os

import pytest

from tandem.bench.cli import build_parser, run

RATE = 200
SECONDS = 3


def _run_once(url, out):
    args = build_parser().parse_args([
        "--url", url, "--workload", "chat", "--rate", str(RATE), "--arrival", "constant",
        "--max-requests", str(RATE * SECONDS), "--wl", "chat_isl=128,chat_isl_cv=0,chat_osl=16,chat_osl_cv=0",
        "--out", str(out), "--quiet"])
    assert run(args) == 0
    return json.loads(out.read_text())


def test_sustains_200_streamed_requests_per_second(servers, tmp_path, record_property, stub_args):
    url = servers.start(stub_args["raw"](ttft_ms=5, itl_ms=2))
    n = RATE * SECONDS
    for attempt in (1, 2):
        rep = _run_once(url, tmp_path / f"o{attempt}.json")
        over, client = rep["summary"]["overall"], rep["client"]
        lag = client["dispatch_lag_ms"]
        numbers = {"attempt": attempt, "loadavg_1m": round(os.getloadavg()[0], 2),
                   "requests": over["requests_total"], "completed": over["requests_completed"],
                   "scheduled_rate": round(client["scheduled_rate"], 1), "send_rate": round(client["send_rate"], 1),
                   "lag_p50_ms": round(lag["p50"], 2), "lag_p99_ms": round(lag["p99"], 2),
                   "lag_max_ms": round(lag["max"], 2), "client_cpu_ms_per_request": round(client["cpu_ms_per_request"], 3),
                   "ttft_p50_ms": round(over["ttft_ms"]["p50"], 2), "itl_p50_ms": round(over["itl_ms"]["p50"], 2)}
        print(f"\nclient overhead @{RATE} req/s:", numbers)
        for k, v in numbers.items():
            record_property(f"{k}_{attempt}", v)
        assert over["requests_total"] == n and over["requests_completed"] == n
        assert over["output_tokens"] == 16 * n
        # CPU the client spends per streamed request: at 200 req/s it must need well under one core
        assert client["cpu_ms_per_request"] * RATE < 600.0
        on_schedule = client["send_rate"] == pytest.approx(RATE, rel=0.03) and lag["p99"] < 50.0
        # this machine is shared: one retry when other processes overload it during the first run
        if on_schedule or attempt == 2 or os.getloadavg()[0] < (os.cpu_count() or 1):
            break
    assert client["send_rate"] == pytest.approx(RATE, rel=0.03)      # did not fall behind
    assert lag["p99"] < 50.0
