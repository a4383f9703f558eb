"""Local runtime: worker subprocesses on this machine, talking over ipc:// sockets.

Each worker is `python -m tandem.worker.proc` in its own session (so a terminal Ctrl-C reaches only
the frontend, which then stops the workers in order). Workers die with their parent
(PR_SET_PDEATHSIG and a parent-pid check), and `shutdown()` (also run at exit) terminates, then
kills, whatever is left.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tandem.runtime.base import Runtime, WorkerSpec

log = logging.getLogger("tandem.runtime.local")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LocalRuntime(Runtime):
    def __init__(self, sock_dir: str | None = None, python: str | None = None, status_interval: float = 0.1,
                 log_level: str | None = None, stdout=None, stderr=None):
        self._own_dir = sock_dir is None
        self.sock_dir = sock_dir or tempfile.mkdtemp(prefix="tandem-")
        self.out_addr = f"ipc://{self.sock_dir}/out"
        self.python = python or sys.executable
        self.status_interval = status_interval
        self.log_level = log_level
        self.stdout, self.stderr = stdout, stderr
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, WorkerSpec] = {}
        self._closed = False
        atexit.register(self.shutdown)

    def in_addr(self, worker_id: str) -> str:
        return f"ipc://{self.sock_dir}/{worker_id}.in"

    def start_worker(self, spec: WorkerSpec) -> None:
        if spec.worker_id in self.procs and self.procs[spec.worker_id].poll() is None:
            raise ValueError(f"worker {spec.worker_id!r} is already running")
        env = dict(os.environ)
        env.update(spec.env)
        threads = spec.engine_config.get("cpu_threads")
        if spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
        elif threads:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [self.python, "-m", "tandem.worker.proc", "--worker-id", spec.worker_id, "--model", spec.model,
               "--in-addr", self.in_addr(spec.worker_id), "--out-addr", self.out_addr, "--role", spec.role,
               "--engine-config", json.dumps(spec.engine_config), "--status-interval", str(self.status_interval),
               "--parent-pid", str(os.getpid())]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=self.stderr,
                             start_new_session=True)
        self.procs[spec.worker_id] = p
        self.specs[spec.worker_id] = spec
        log.info("started worker %s (pid %d)", spec.worker_id, p.pid)

    def pid(self, worker_id: str) -> int | None:
        p = self.procs.get(worker_id)
        return p.pid if p else None

    def exited(self) -> dict[str, int]:
        return {wid: p.returncode for wid, p in self.procs.items() if p.poll() is not None}

    def kill(self, worker_id: str) -> None:
        """SIGKILL a worker now, without waiting (e.g. one that stopped answering)."""
        p = self.procs.get(worker_id)
        if p is not None and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_worker(self, worker_id: str, timeout: float = 5.0) -> None:
        p = self.procs.get(worker_id)
        if p is not None:
            self._stop([p], timeout)

    @staticmethod
    def _stop(procs: list[subprocess.Popen], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for sig, wait in ((None, timeout * 0.5), (signal.SIGTERM, timeout * 0.5), (signal.SIGKILL, 5.0)):
            live = [p for p in procs if p.poll() is None]
            if not live:
                return
            if sig is not None:
                for p in live:
                    try:
                        os.kill(p.pid, sig)
                    except ProcessLookupError:
                        pass
            end = min(deadline, time.monotonic() + wait) if sig != signal.SIGKILL else time.monotonic() + wait
            for p in live:
                try:
                    p.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Workers were asked to exit over their sockets; give them `timeout`/2, then SIGTERM, then SIGKILL."""
        if self._closed:
            return
        self._closed = True
        self._stop(list(self.procs.values()), timeout)
        if self._own_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)

    def describe(self) -> dict:
        return {"kind": "local", "sock_dir": self.sock_dir,
                "workers": {wid: {"pid": p.pid, "returncode": p.poll()} for wid, p in self.procs.items()}}
