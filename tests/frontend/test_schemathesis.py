"""Schemathesis against the served OpenAPI schema: no request, valid or not, gets a 5xx."""
from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from tests.frontend.conftest import API_KEY


def test_openapi_schema_served(server):
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/cluster"):
        assert p in paths


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis CLI not installed")
    cmd = [exe, "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
           "--phases", "coverage,fuzzing", "--max-examples", "10", "--seed", "1", "--no-shrink",
           "--workers", "1", "--request-timeout", "60", "-H", f"Authorization: Bearer {API_KEY}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)   # its cache dir goes there
    out = r.stdout[-8000:] + r.stderr[-3000:]
    assert r.returncode == 0, out
    assert "No issues found" in out, out
    # and the server is still healthy afterwards
    assert httpx.get(server.url + "/health").status_code == 200


def test_frontend_process_never_loads_torch(server):
    """The frontend (HTTP) process stays light: only worker processes import torch."""
    maps = open(f"/proc/{server.proc.pid}/maps").read()
    assert "libtorch" not in maps
    for pid in server.worker_pids:
        assert "libtorch" in open(f"/proc/{pid}/maps").read()
