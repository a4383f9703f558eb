"""Fixtures for the bench tests: trace files, stub servers in subprocesses, report checks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TRACES = Path(__file__).parents[2].parent / "shared" / "traces"
AZURE_CONV = TRACES / "azure2023_conv_181546-184500.csv"
AZURE_CODE = TRACES / "azure2023_code_181703-184500.csv"
MOONCAKE = TRACES / "mooncake_fast25_conversation_0-30min.jsonl"


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    if not (AZURE_CONV.exists() and AZURE_CODE.exists() and MOONCAKE.exists()):
        pytest.skip(f"shared traces not found at {TRACES}")
    return TRACES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not up after {timeout} s")


class Servers:
    """Starts servers in subprocesses; stops exactly the ones it started."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], health_path: str = "/health", port: int | None = None,
              timeout: float = 30.0) -> str:
        port = port or free_port()
        cmd = [sys.executable] + [a.replace("{port}", str(port)) for a in args]
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + health_path, proc, timeout)
        return url

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def module_servers():
    s = Servers()
    yield s
    s.stop()


def _with_flags(args: list[str], kw: dict) -> list[str]:
    """args + one --flag-name per keyword: bare for True, left out for None/False, else with its value."""
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v not in (None, False):
            args += [flag, str(v)]
    return args


def fastapi_stub_args(**kw) -> list[str]:
    return _with_flags([str(HERE / "fastapi_stub.py"), "--port", "{port}"], kw)


def raw_stub_args(**kw) -> list[str]:
    return _with_flags(["-m", "tandem.bench.stub", "--port", "{port}"], kw)


def check_report_consistent(report: dict) -> None:
    """The summary equals a recomputation from the raw records (with numpy, not tandem.bench)."""
    from tandem.bench.report import build_report

    again = build_report({k: v for k, v in report["config"].items()}, report["requests"], report["timeline"])
    assert again["summary"] == report["summary"]

    reqs = report["requests"]
    ok = [r for r in reqs if r["status"] == "ok"]
    start = min(r["arrival_s"] for r in reqs)
    end = max(r["arrival_s"] + r["dispatch_lag_s"] + (r["e2e_s"] or 0) for r in reqs)
    dur = end - start
    over = report["summary"]["overall"]
    assert over["duration_s"] == pytest.approx(dur, rel=1e-9)
    assert over["requests_completed"] == len(ok)
    assert over["requests_failed"] == len(reqs) - len(ok)
    assert over["request_throughput"] == pytest.approx(len(ok) / dur)
    assert over["output_throughput"] == pytest.approx(sum(r["output_tokens"] for r in ok) / dur)
    if ok:
        ttft = np.array([r["token_times_s"][0] for r in ok]) * 1e3
        assert over["ttft_ms"]["p50"] == pytest.approx(np.percentile(ttft, 50))
        assert over["ttft_ms"]["p99"] == pytest.approx(np.percentile(ttft, 99))
        assert over["ttft_ms"]["mean"] == pytest.approx(ttft.mean())
        tpot = np.array([(r["e2e_s"] - r["token_times_s"][0]) / (r["output_tokens"] - 1)
                         for r in ok if r["output_tokens"] > 1]) * 1e3
        if len(tpot):
            assert over["tpot_ms"]["p90"] == pytest.approx(np.percentile(tpot, 90))
        itl = np.concatenate([np.diff(r["token_times_s"]) for r in ok]) * 1e3
        if len(itl):
            assert over["itl_ms"]["p99"] == pytest.approx(np.percentile(itl, 99))
            assert over["itl_ms"]["mean"] == pytest.approx(itl.mean())
        e2e = np.array([r["e2e_s"] for r in ok]) * 1e3
        assert over["e2e_ms"]["p90"] == pytest.approx(np.percentile(e2e, 90))
    classes = {r["cls"] for r in reqs}
    assert set(report["summary"]) == {"overall"} | classes
    assert sum(report["summary"][c]["requests_completed"] for c in classes) == len(ok)
    errs: dict = {}
    for r in reqs:
        if r["status"] != "ok":
            errs[r["error_kind"]] = errs.get(r["error_kind"], 0) + 1
    assert over["errors"] == errs


@pytest.fixture
def consistent():
    return check_report_consistent


@pytest.fixture(scope="session")
def stub_args():
    return {"fastapi": fastapi_stub_args, "raw": raw_stub_args}
