"""The runtime interface (torch-free)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class WorkerSpec:
    worker_id: str
    model: str                                   # HF-format model directory
    role: str = "both"
    engine_config: dict = field(default_factory=dict)   # EngineConfig fields besides `model`
    gpu: int | None = None                       # physical GPU index (None: CPU)
    env: dict = field(default_factory=dict)


class Runtime(ABC):
    """Starts and stops workers. Workers connect to `out_addr` (the frontend's PULL socket) and
    register themselves by sending `Ready`."""

    out_addr: str

    @abstractmethod
    def start_worker(self, spec: WorkerSpec) -> None: ...

    @abstractmethod
    def stop_worker(self, worker_id: str, timeout: float = 5.0) -> None: ...

    def kill(self, worker_id: str) -> None:
        """Stop a worker at once, without waiting (one that stopped answering). Default: stop_worker."""
        self.stop_worker(worker_id, timeout=0.0)

    @abstractmethod
    def exited(self) -> dict[str, int]:
        """worker_id -> exit code, for every started worker whose process has ended."""

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker (no orphans)."""

    def describe(self) -> dict:
        return {"kind": type(self).__name__}
