"""Do the worker stalls on a real run's token timeline coincide with the worker's GC pauses?

    python benchmarks/gclog/overlap.py OUT_DIR PROFILE_CAL.json REAL_A.json [REAL_B.json ...]

OUT_DIR/gc/gc_<pid>.json are written by benchmarks/gclog/sitecustomize.py (TANDEM_GC_LOG_DIR); the
reports are `tandem bench` runs against that server (their t0_monotonic lines the clocks up). A stall
is a busy engine step longer than the calibrated model (T_profile + a + s*b + median admission) by
more than 10 ms.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def main(argv: list[str]) -> int:
    from tandem.sim.calibrate import step_samples
    from tandem.sim.profile import SimProfile
    out, prof_path, reals = argv[0], argv[1], argv[2:]
    files = sorted(glob.glob(os.path.join(out, "gc", "gc_*.json")))
    logs = [json.load(open(f, encoding="utf-8")) for f in files]
    workers = [g for g in logs if any("worker" in str(a) for a in g.get("argv", []))]
    if not workers:
        print(f"GC log: no worker log in {out}/gc ({len(logs)} process logs): nothing to compare")
        return 0
    prof = SimProfile.load(prof_path)
    sv = prof.serving
    adm = sorted(sv.new_q)[len(sv.new_q) // 2] if sv.new_q else sv.new_s
    pauses = sorted((p[0], p[2] / 1e3) for g in workers for p in g["pauses"] if p[1] == 2)
    for path in reals:
        real = json.load(open(path, encoding="utf-8"))
        t0 = real["config"].get("t0_monotonic")
        if t0 is None:
            print(f"{path}: no t0_monotonic in the report")
            continue
        steps = step_samples(real, prof)
        end = max(x.t_s for x in steps) if steps else 0.0
        mine = [(s - t0, d) for s, d in pauses if 0.0 <= s - t0 <= end]
        stalls = [x for x in steps if x.gap_s - x.model_s - sv.step_s - sv.seq_s * x.n_seqs - adm * x.n_new > 0.010]
        hit = sum(1 for x in stalls if any(s < x.t_s and s + d > x.t_s - x.gap_s for s, d in mine))
        ds = sorted(d * 1e3 for _, d in mine)
        gc_txt = (f"{len(ds)} worker gen-2 collections ({sum(ds) / 1e3:.2f} s; median {ds[len(ds) // 2]:.1f} ms, "
                  f"max {ds[-1]:.1f} ms)" if ds else "no worker gen-2 collection")
        print(f"{os.path.basename(path)}: {gc_txt}; {len(stalls)} stalls > 10 ms over the model "
              f"({sum(x.gap_s for x in stalls):.2f} s), {hit} of them during a worker gen-2 collection")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
