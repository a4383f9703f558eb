"""Helpers: build requests and run the simulator without the command line."""
from __future__ import annotations

import random

from tandem.bench.traces import BenchRequest, finalize
from tandem.sim.cli import build_parser
from tandem.sim.run import simulate

VOLATILE = ("started_at", "wall_s")
VOLATILE_SIM = ("speedup", "cpu_s", "speedup_cpu")


def reqs(specs) -> list[BenchRequest]:
    """specs: (arrival_s, isl, osl[, priority[, cls[, hash_ids, block_size]]])"""
    out = []
    for s in specs:
        t, isl, osl = s[:3]
        prio = s[3] if len(s) > 3 else "interactive"
        cls = s[4] if len(s) > 4 else ("chat" if prio == "interactive" else "batch")
        hids = list(s[5]) if len(s) > 5 else []
        bsz = s[6] if len(s) > 6 else 512
        out.append(BenchRequest(arrival_s=t, cls=cls, priority=prio, isl=isl, osl=osl, hash_ids=hids,
                                block_size=bsz))
    return finalize(out)


def random_reqs(n: int, seed: int = 0, rate: float = 50.0, isl=(16, 900), osl=(1, 120),
                priorities=("interactive", "batch"), shared: bool = False) -> list[BenchRequest]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        isl_i = rng.randint(*isl)
        hids = []
        if shared:                                # a few shared system prompts of 64-token blocks
            k = max(1, isl_i // 64)
            root = rng.randrange(3)
            hids = [root * 1000 + j for j in range(min(k, rng.randint(1, 6)))]
        out.append((t, isl_i, rng.randint(*osl), rng.choice(priorities), None, hids, 64))
    specs = [(a, b, c, d, ("chat" if d == "interactive" else "batch"), h, bs) for a, b, c, d, _, h, bs in out]
    return reqs(specs)


def args_for(profile, *extra: str):
    a = build_parser().parse_args(["--workload", "chat", "--profile", "unused", "--out", "unused.json",
                                   "--quiet", *extra])
    a.profile = profile
    return a


def run(profile, requests, *extra: str):
    """(report, cluster) for `requests` with CLI flags `extra` (e.g. "--gpus", "2")."""
    args = args_for(profile, *extra)
    return simulate(args, requests, {"source": "test"})


def stable(report: dict) -> dict:
    """The report without wall-clock fields (for determinism comparisons)."""
    import copy
    r = copy.deepcopy(report)
    for k in VOLATILE:
        r["config"].pop(k, None)
    for k in VOLATILE_SIM:
        r["config"]["sim"].pop(k, None)
    sh = r["config"]["sim"].get("shards")
    if sh:                                   # how many processes ran the domains, and their CPU time
        sh.pop("jobs")
        for d in sh["per_domain"]:
            d.pop("cpu_s")
    return r
