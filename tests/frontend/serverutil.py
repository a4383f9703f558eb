"""Start a real `tandem serve` subprocess on a free port and always stop it (and its workers)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, args: list[str], workers: int = 1, env: dict | None = None, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.workers = workers
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile(prefix="tandem-serve-", suffix=".log", delete=False)
        pool_flags = [] if "--prefill" in args else ["--workers", str(workers)]
        cmd = [sys.executable, "-m", "tandem.cli", "serve", "--port", str(self.port), *pool_flags,
               "--log-level", "warning", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        e = dict(os.environ)
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=e, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.worker_pids: list[int] = []

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def logs(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 150.0) -> "ServerProc":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("workers_alive", 0) >= self.workers:
                    c = httpx.get(self.url + "/v1/cluster", headers=self.headers, timeout=5).json()
                    self.worker_pids = [w["pid"] for w in c["workers"] if w.get("pid")]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.logs()}")

    def cluster(self) -> dict:
        return httpx.get(self.url + "/v1/cluster", headers=self.headers, timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # workers must be gone with their parent; never leave any behind
        deadline = time.monotonic() + 10
        for pid in self.worker_pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); check its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
