"""Host-speed probe: one JSON line of what makes host-bound engine steps fast or slow on this machine.

Why: eager prefill on a small model is host-launch bound (docs/benchmarks.md: ~170-340 launches, Triton's
Python launcher ~50-80 us each), so the same engine code runs its prefill chunk steps at different speeds
on different lent machines (validation runs 3 vs 4: 2048-token prefill 9.7 vs 14.6 ms, same GPU numbers).
Printing this next to a benchmark tells machine variance apart from a code change:
- cpu: model name, logical CPUs, load average, mean current MHz (from /proc);
- python_us: one pass of the runner's per-token slot loop for 2048 tokens (pure Python host work);
- torch_launch_us: wall per eager launch of a tiny torch op (the GPU stays idle: host cost only);
- triton_launch_us: the same for a trivial Triton kernel (CUDA only, when triton imports);
- gpu: nvidia-smi's SM clock / max, temperature, power, pstate (CUDA only).

    python benchmarks/host_probe.py [--device cuda] [--label before-D] [--append host.jsonl]   # CPU: ~1 s
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time


try:                                                        # a trivial kernel: Triton's launch cost only
    import triton
    import triton.language as tl

    @triton.jit
    def _inc(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1, mask=o < n)
except Exception:                                           # no triton (CPU boxes): torch launches only
    _inc = None


def cpu_info() -> dict:
    model, mhz = "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "model name" and not model:
                    model = v.strip()
                elif k.strip() == "cpu MHz":
                    mhz.append(float(v))
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "load1": round(os.getloadavg()[0], 2),
            "mhz_mean": round(statistics.fmean(mhz), 1) if mhz else None}


def _best_us(fn, n: int, repeats: int = 5) -> float:
    """Best of `repeats` means over n calls, in microseconds per call (best: the machine's speed, not noise)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return round(best * 1e6, 3)


def python_us(tokens: int = 2048, bs: int = 16) -> float:
    """The runner's per-token slot loop for one `tokens`-token chunk (tandem/engine/runner.py execute)."""
    table = list(range(tokens // bs + 1))

    def loop():
        slots = []
        for p in range(tokens):
            slots.append(table[p // bs] * bs + p % bs)
    return _best_us(loop, 20)


def launch_us(device: str) -> dict:
    out = {}
    try:
        import torch
    except ImportError:
        return out
    x = torch.zeros(16, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def eager():
        torch.add(x, 1, out=y)
    eager()
    sync()
    out["torch_launch_us"] = _best_us(eager, 500)
    sync()
    if device.startswith("cuda") and _inc is not None:
        def tri():
            _inc[(1,)](x, y, 16, BLOCK=16)
        try:
            tri()                                           # compile outside the timing
            sync()
            out["triton_launch_us"] = _best_us(tri, 500)
            sync()
        except Exception as e:                              # keep the other numbers
            out["triton_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def gpu_info() -> dict | None:
    q = "name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,pstate"
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return dict(zip(q.split(","), (v.strip() for v in r.stdout.splitlines()[0].split(","))))


def probe(device: str = "cpu", label: str = "") -> dict:
    rec = {"label": label, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device,
           "cpu": cpu_info(), "python_us": python_us()}
    rec.update(launch_us(device))
    if device.startswith("cuda"):
        rec["gpu"] = gpu_info()
    return rec


def summary(rec: dict) -> str:
    g = rec.get("gpu") or {}
    return (f"host {rec['label'] or '-'}: python {rec['python_us']:.0f} us, torch launch "
            f"{rec.get('torch_launch_us', 0):.1f} us, triton launch {rec.get('triton_launch_us', 0):.1f} us, "
            f"load {rec['cpu']['load1']}, CPU {rec['cpu']['mhz_mean']} MHz, SM {g.get('clocks.sm', '-')} MHz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="")
    p.add_argument("--append", metavar="FILE", help="append the JSON line to FILE and print a one-line summary")
    a = p.parse_args(argv)
    rec = probe(a.device, a.label)
    if a.append:
        with open(a.append, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        print(summary(rec), flush=True)
    else:
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
