"""Step-timeline calibration on a run shaped like the real async engine's (issue 7): the tokens of the
step before an admitting step arrive late, right before the admitting step's own, and prompts may hit
the prefix cache. The fit must recover the overheads the run was made with."""
from __future__ import annotations

import random

import pytest

from tandem.sim.calibrate import bootstrap_interval, fit_step_overheads, latency_samples, step_samples
from tandem.sim.profile import SimProfile

A, S, N = 0.4e-3, 0.05e-3, 2.0e-3          # per step, per sequence, per admitted request (seconds)


def _async_run(prof: SimProfile, n_req: int = 60, seed: int = 0, late_every: int = 0) -> dict:
    """One worker serving `n_req` requests step by step with known overheads; a step that admits a
    request (and every `late_every`-th step) delays the previous step's tokens to 0.2 ms before its own
    (async scheduling)."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n_req):
        isl = rng.randrange(100, 400)
        reqs.append({"idx": i, "arrival_s": 0.03 * i + rng.uniform(0, 0.01), "isl": isl,
                     "cached_tokens": 96 if i % 2 else 0, "osl": rng.randrange(20, 60), "times": []})
    t, waiting, running, steps = 0.0, list(reqs), [], []
    while waiting or running:
        new = [r for r in waiting if r["arrival_s"] <= t][:1]
        if not new and not running:
            t = waiting[0]["arrival_s"]
            continue
        for r in new:
            waiting.remove(r)
        dec = [r for r in running]
        ctx = sum(r["isl"] + len(r["times"]) for r in dec)
        pf = sum(r["isl"] - r["cached_tokens"] for r in new)
        xc = sum(prof.ctx_extra(r["cached_tokens"], r["isl"] - r["cached_tokens"]) for r in new)
        t += prof.step_time(len(dec), ctx, pf, xc) + A + S * (len(dec) + len(new)) + N * len(new)
        steps.append((t, dec + new, bool(new)))
        running = [r for r in dec + new if len(r["times"]) + 1 < r["osl"]]
        for r in dec + new:
            r["times"].append(None)                 # placeholder: emission times below
    emitted = {}
    adm = [x[2] for x in steps] + [False]
    extra = {k for k in range(1, len(steps)) if late_every and k % late_every == 0
             and not (adm[k - 1] or adm[k] or adm[k + 1])}          # no chains of late steps
    for j, (end, batch, _) in enumerate(steps):
        late = j + 1 < len(steps) and (adm[j + 1] or j + 1 in extra)
        emit = steps[j + 1][0] - 2e-4 if late else end
        for pos, r in enumerate(batch):            # in batch order (new requests last), 10 us apart
            k = emitted.get(r["idx"], 0)
            r["times"][k] = emit + 1e-5 * pos - r["arrival_s"]
            emitted[r["idx"]] = k + 1
    out = []
    for r in reqs:
        tt = r["times"]
        out.append({"idx": r["idx"], "arrival_s": r["arrival_s"], "dispatch_lag_s": 0.0, "status": "ok",
                    "isl": r["isl"], "cached_tokens": r["cached_tokens"], "output_tokens": len(tt),
                    "token_times_s": tt, "ttft_s": tt[0], "e2e_s": tt[-1]})
    return {"requests": out}


def test_async_admission_steps_are_paired_and_overheads_recovered(profile_dict):
    prof = SimProfile(profile_dict)
    samples = step_samples(_async_run(prof), prof)
    pairs = [x for x in samples if x.steps == 2]
    assert len(pairs) >= 30 and all(x.n_new == 1 for x in pairs)
    assert all(x.n_new == 0 for x in samples if x.steps == 1)
    fit = fit_step_overheads(samples)
    assert fit["step_s"] == pytest.approx(A, rel=0.05)
    assert fit["seq_s"] == pytest.approx(S, rel=0.05)
    assert fit["new_s"] == pytest.approx(N, rel=0.05)          # the cached tokens were not charged as prefill
    assert fit["resid_rms_s"] < 1e-4


def test_late_steps_without_admission_are_paired_too(profile_dict):
    """A step's tokens may also arrive late with no admission in sight: the pair is two steps long."""
    prof = SimProfile(profile_dict)
    samples = step_samples(_async_run(prof, late_every=3), prof)
    assert sum(1 for x in samples if x.steps == 2 and x.n_new == 0) >= 20
    assert min(x.gap_s for x in samples if x.steps == 1) > 0.5 * min(x.model_s for x in samples)
    fit = fit_step_overheads(samples)
    assert fit["step_s"] == pytest.approx(A, rel=0.05) and fit["seq_s"] == pytest.approx(S, rel=0.05)
    assert fit["new_s"] == pytest.approx(N, rel=0.05)


def test_bootstrap_interval_of_p90():
    xs = [float(i) for i in range(1, 401)]
    lo, hi = bootstrap_interval(xs, 0.9)
    assert lo < 360.1 < hi and hi - lo < 40
    assert bootstrap_interval(xs, 0.9) == (lo, hi)            # fixed seed: the same table every time
    assert bootstrap_interval(xs[:10], 0.9) is None
    rep = {"requests": [{"status": "ok", "ttft_s": 0.01, "e2e_s": 0.05, "output_tokens": 5},
                        {"status": "ok", "ttft_s": 0.02, "e2e_s": 0.02, "output_tokens": 1},
                        {"status": "error", "ttft_s": None}]}
    assert latency_samples(rep, "ttft_ms") == [10.0, 20.0]
    assert latency_samples(rep, "tpot_ms") == [pytest.approx(10.0)]
