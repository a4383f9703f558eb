"""GC pause log for the processes of a benchmark run (benchmarks/validate_sim.sh puts this directory on
PYTHONPATH for `tandem serve` only, so the frontend and its workers load it at start-up).

With TANDEM_GC_LOG_DIR set, every garbage collection of generation 2, and any other one over 1 ms, is
recorded as (start on time.perf_counter, i.e. CLOCK_MONOTONIC like `tandem bench`'s t0_monotonic,
generation, duration ms, objects collected) and written at exit to TANDEM_GC_LOG_DIR/gc_<pid>.json.
Why: the GPU run's token timeline shows 20-65 ms worker stalls, and a full collection of a process
holding an engine takes ~100 ms on the CI box; this tells whether they coincide. Any
sitecustomize.py further along sys.path is still run.
"""
import os
import sys


def _install(out_dir: str) -> None:
    import atexit
    import gc
    import json
    import time
    t0 = [0.0]
    counts = [0, 0, 0]
    pauses: list = []

    def cb(phase, info):
        if phase == "start":
            t0[0] = time.perf_counter()
            return
        d = time.perf_counter() - t0[0]
        g = info.get("generation", 0)
        counts[g] += 1
        if (g == 2 or d > 1e-3) and len(pauses) < 200_000:
            pauses.append((round(t0[0], 6), g, round(d * 1e3, 3), info.get("collected", 0)))

    def dump():
        try:
            with open(os.path.join(out_dir, f"gc_{os.getpid()}.json"), "w", encoding="utf-8") as f:
                json.dump({"argv": sys.argv[:3], "counts": counts, "pauses": pauses}, f)
        except Exception:  # noqa: BLE001 - a log must never break the process
            pass

    gc.callbacks.append(cb)
    atexit.register(dump)


if os.environ.get("TANDEM_GC_LOG_DIR"):
    try:
        os.makedirs(os.environ["TANDEM_GC_LOG_DIR"], exist_ok=True)
        _install(os.environ["TANDEM_GC_LOG_DIR"])
    except Exception:  # noqa: BLE001
        pass

_here = os.path.dirname(os.path.abspath(__file__))
for _p in sys.path:
    _f = os.path.join(os.path.abspath(_p or "."), "sitecustomize.py")
    if os.path.dirname(_f) != _here and os.path.isfile(_f):
        try:
            with open(_f, encoding="utf-8") as _fh:
                exec(compile(_fh.read(), _f, "exec"), {"__name__": "sitecustomize", "__file__": _f})
        except Exception:  # noqa: BLE001
            pass
        break
