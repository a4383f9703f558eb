"""Closed-loop load test (not collected by pytest): C concurrent streaming clients against a server.

    python tests/frontend/bench_closed_loop.py --url http://127.0.0.1:8000 --concurrency 8 --duration 30

Each client sends a /v1/completions streaming request (random-word prompt of ~--isl tokens,
--osl output tokens with ignore_eos) and starts the next one when it finishes. Reports requests/s,
output tokens/s, TTFT and TPOT percentiles.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import httpx

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cyan magenta yellow black white").split()


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def client(c: httpx.AsyncClient, args, stop_at: float, rng: random.Random, out: list):
    while time.monotonic() < stop_at:
        prompt = " ".join(rng.choice(WORDS) for _ in range(args.isl))
        body = {"model": args.model, "prompt": prompt, "max_tokens": args.osl, "ignore_eos": True,
                "stream": True, "temperature": 0}
        t0 = time.monotonic()
        ttft = None
        n = 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.append({"ok": False, "status": r.status_code})
                await r.aread()
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                ch = json.loads(line[6:])
                if ch["choices"] and ch["choices"][0]["text"]:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    n += 1
        e2e = time.monotonic() - t0
        out.append({"ok": True, "ttft": ttft, "e2e": e2e, "t_end": time.monotonic()})


async def main_async(args):
    stop_at = time.monotonic() + args.duration + args.warmup
    out: list = []
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=300, limits=limits) as c:
        t_start = time.monotonic()
        await asyncio.gather(*[client(c, args, stop_at, random.Random(i), out) for i in range(args.concurrency)])
        t_end = time.monotonic()
    warm_end = t_start + args.warmup
    done = [o for o in out if o["ok"] and o["t_end"] >= warm_end]
    dur = t_end - warm_end
    ttft = [o["ttft"] * 1000 for o in done if o["ttft"] is not None]
    tpot = [(o["e2e"] - o["ttft"]) * 1000 / (args.osl - 1) for o in done if o["ttft"] is not None]
    res = {"concurrency": args.concurrency, "isl_words": args.isl, "osl": args.osl, "duration_s": round(dur, 1),
           "requests": len(done), "failed": sum(1 for o in out if not o["ok"]),
           "request_throughput": round(len(done) / dur, 2),
           "output_tok_s": round(len(done) * args.osl / dur, 1),
           "ttft_ms": {"p50": round(pct(ttft, 50), 1), "p90": round(pct(ttft, 90), 1),
                       "mean": round(statistics.fmean(ttft), 1) if ttft else None},
           "tpot_ms": {"p50": round(pct(tpot, 50), 2), "p90": round(pct(tpot, 90), 2)},
           "loadavg": os.getloadavg()}
    print(json.dumps(res, indent=2))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--isl", type=int, default=32, help="prompt words (~tokens)")
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--warmup", type=float, default=3)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
