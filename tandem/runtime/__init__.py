"""Runtimes: how worker processes are started and found.

`Runtime` is the interface (`local` today; a Ray runtime later implements the same four methods with
workers as Ray actors — the data plane stays ZeroMQ: workers announce their own address in `Ready`).
"""
from tandem.runtime.base import Runtime, WorkerSpec
from tandem.runtime.local import LocalRuntime

__all__ = ["Runtime", "WorkerSpec", "LocalRuntime"]
