"""Where `tandem sim` spends its CPU: a `tandem sim` command line run under cProfile, with a count of
the event loop's events by kind (CPU only; docs/sim.md "Speed").

    python benchmarks/sim_profile.py [--top N] -- <tandem sim flags>
    python benchmarks/sim_profile.py -- --trace $T --trace-start 900 --duration 10 --gpus 1000 \\
        --replicate 2700 --profile profiles/h100_llama-3.1-8b.json --block-size 64 --records none \\
        --token-times none --quiet --out /tmp/g.json

Worker events are split by what the engine was doing when they fired: `step` (a step through the
real scheduler, including a decode window cut by an arrival), `window` (a planned run of decode
steps ending at a finish or a chunk end), `boundary`, and `stale` (superseded by a later
reschedule; popped and dropped). cProfile roughly doubles the run time; the counts are exact.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import heapq
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tandem.engine import sim_engine  # noqa: E402
from tandem.sim import cli, cluster  # noqa: E402

_KINDS = {cluster.EV_XFER: "transfer", cluster.EV_LIFE: "lifecycle", cluster.EV_PUBLISH: "publish",
          cluster.EV_TIMELINE: "timeline", cluster.EV_PLANNER: "planner", cluster.EV_CALL: "call"}
_STATES = {sim_engine.STEP: "step", sim_engine.WINDOW: "window", sim_engine.BOUNDARY: "boundary",
           sim_engine.IDLE: "idle"}


def counted_run(counts: collections.Counter):
    """SimCluster.run with its heap pops counted by event kind (only the cluster's own heap)."""
    orig = cluster.SimCluster.run

    def run(self, progress=None):
        pop, mine = heapq.heappop, self.heap

        def counting_pop(h):
            x = pop(h)
            if h is mine:
                kind, obj, gen = x[2], x[3], x[4]
                if kind == cluster.EV_WORKER:
                    counts["worker:" + ("stale" if obj.gen != gen else _STATES[obj.engine.state])] += 1
                else:
                    counts[_KINDS.get(kind, str(kind))] += 1
            return x
        heapq.heappop = counting_pop             # run() binds heapq.heappop when it starts
        try:
            return orig(self, progress)
        finally:
            heapq.heappop = pop
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=30, help="functions to list by own time")
    ap.add_argument("sim_args", nargs=argparse.REMAINDER, help="-- then the tandem sim flags")
    a = ap.parse_args()
    sim_args = a.sim_args[1:] if a.sim_args[:1] == ["--"] else a.sim_args
    counts: collections.Counter = collections.Counter()
    cluster.SimCluster.run = counted_run(counts)
    prof = cProfile.Profile()
    prof.enable()
    rc = cli.main(sim_args)
    prof.disable()
    total = sum(counts.values())
    print(f"events popped: {total:,}")
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} {v:>12,}")
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(a.top)
    return rc


if __name__ == "__main__":
    sys.exit(main())
