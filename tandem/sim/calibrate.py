"""Measure the serving path's host overheads from a real run, for the simulator.

A perf profile times isolated engine steps. A real server adds host time that the profile does not
contain. The simulated engine models it with four terms of physical meaning (`ServingOverhead`):

    step = T_profile(batch) + a + s * n_seqs + n * n_new          (per engine step)
    TTFT += r                                                     (per request, before the router)

a: worker loop per step; s: per sequence in the step (its output delta built, sent, streamed);
n: per request in its first step (admission, prefill inputs); r: HTTP in/out, routing.
On a real server n is heavy-tailed (most admissions cost ~nothing, a few stall the worker for tens of
ms), and that tail is what sets TTFT p90; so its measured distribution is kept too.

**Method `steps` (default).** The step terms are measured on the real run's own token timeline, not
fitted to its latency percentiles. One worker emits the tokens of all its running requests once per
step, so the client's per-chunk receive times (`tandem bench` records them) cluster by step: a new
cluster starts when the gap to the previous receive exceeds `--join-ms` or a request repeats. For
every pair of consecutive clusters while the engine is busy (a request in both), the gap is a step's
duration and the cluster says its batch: its sequences, which of them are new (first token) and their
contexts, hence T_profile (a prompt's prefill work is its tokens less its prefix-cache hits). With
async scheduling a step that admits a prompt is launched before the previous step's tokens are handed
out, so the admission stall shows in the gap before the *previous* step and the two steps' tokens
arrive back to back: an admitting step is taken together with the step before it (one sample of two
steps; so is a step that came sooner than half its T_profile). a and s come from the samples that
admit nobody by least squares of (gap - T_profile) on (1, n_seqs)
(a negative term dropped); n is the mean of what admitting samples add beyond T_profile + a*steps +
s*n_seqs, and its quantiles over samples that admitted one request give n's distribution (`new_q`),
which the simulated engine draws once per step holding prefill work (`new_per` "prefill_step", the
default; `--new-overhead-per request` keeps the earlier per-request charge). (Pooling all steps in one fit, as before, put the
admission stalls into the decode steps: run 2's slice A fit had residual rms 1.8 ms, now 0.52 ms.)
Steps that may hold a chunk of a prompt longer than the token budget are left out (invisible chunks).
The per-request term r is then the one number that makes the simulated TTFT p50 equal the real one
(a common delay before the router shifts every TTFT by the same amount).

**Method `p50`** (the earlier one): a constant per-step overhead and r iterated until TPOT p50 and
TTFT p50 match. Kept for comparison; it matches medians, not tails.

    python -m tandem.sim.calibrate --real A.json <the tandem sim flags of run A> --out simA.json \\
        --write-profile calibrated.json

`--write-profile` saves the profile with a ``serving_overhead`` section, so `tandem sim --profile
calibrated.json` of another run needs no knobs. A fit on one slice is only a fit: validate it on
another slice measured in the same session (`benchmarks/validate_sim.sh` does both).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

ROWS = [("TTFT p50 ms", "ttft_ms", "p50"), ("TTFT p90 ms", "ttft_ms", "p90"), ("TPOT p50 ms", "tpot_ms", "p50"),
        ("TPOT p90 ms", "tpot_ms", "p90"), ("output tok/s", "output_throughput", None),
        ("requests/s", "request_throughput", None)]
TOLERANCE = 0.15          # issue 7: sim within 15% of real on every row


def _get(m: dict, k: str, q: str | None):
    v = m.get(k)
    return v.get(q) if (q and isinstance(v, dict)) else v


def _pct(v: list[float], q: float) -> float:
    """Percentile with linear interpolation (as the report's summaries), v sorted."""
    pos = q * (len(v) - 1)
    j = int(pos)
    return v[j] + (v[j + 1] - v[j]) * (pos - j) if j + 1 < len(v) else v[-1]


def latency_samples(report: dict, key: str) -> list[float]:
    """Per-request TTFT or TPOT (ms) of the successful requests (TPOT as vLLM: (E2E-TTFT)/(out-1))."""
    out = []
    for r in report.get("requests") or []:
        if r.get("status") != "ok" or r.get("ttft_s") is None:
            continue
        if key == "ttft_ms":
            out.append(r["ttft_s"] * 1e3)
        elif key == "tpot_ms" and (r.get("output_tokens") or 0) > 1 and r.get("e2e_s") is not None:
            out.append((r["e2e_s"] - r["ttft_s"]) * 1e3 / (r["output_tokens"] - 1))
    return out


def bootstrap_interval(xs: list[float], q: float = 0.9, n: int = 300, conf: float = 0.9,
                       seed: int = 7) -> tuple[float, float] | None:
    """`conf` bootstrap interval of the q-quantile of xs (fixed seed: tables are reproducible): how much
    a percentile of a few hundred requests moves by chance alone. None with fewer than 20 samples."""
    import random
    if len(xs) < 20:
        return None
    rng = random.Random(seed)
    k = len(xs)
    est = sorted(_pct(sorted(rng.choices(xs, k=k)), q) for _ in range(n))
    lo = (1.0 - conf) / 2
    return _pct(est, lo), _pct(est, 1.0 - lo)


def table(real: dict, sim: dict, verdict: bool = False, tol: float = TOLERANCE) -> str:
    """Markdown table of the overall summaries of two reports (with a within-`tol` column if asked).
    p50/p90 rows also show the real value's 90% bootstrap interval over its requests (run-to-run noise)."""
    a, b = real["summary"]["overall"], sim["summary"]["overall"]
    head = "| metric | real | real 90% CI | sim | sim/real |" + (f" within {tol:.0%} |" if verdict else "")
    lines = [head, "|---|---|---|---|---|" + ("---|" if verdict else "")]
    for name, k, q in ROWS:
        x, y = _get(a, k, q), _get(b, k, q)
        ci = bootstrap_interval(latency_samples(real, k), 0.5 if q == "p50" else 0.9) if q else None
        cis = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"
        if x is None or y is None or not x:
            lines.append(f"| {name} | {x} | {cis} | {y} | - |" + (" no |" if verdict else ""))
            continue
        ratio = y / x
        ok = abs(ratio - 1.0) <= tol
        mark = (" yes |" if ok else " NO |") if verdict else ""
        lines.append(f"| {name} | {x:.2f} | {cis} | {y:.2f} | {ratio:.3f} |{mark}")
    return "\n".join(lines)


def all_within(real: dict, sim: dict, tol: float = TOLERANCE) -> bool:
    a, b = real["summary"]["overall"], sim["summary"]["overall"]
    for _, k, q in ROWS:
        x, y = _get(a, k, q), _get(b, k, q)
        if x is None or y is None or not x or abs(y / x - 1.0) > tol:
            return False
    return True


# ----------------------------------------------------------------------------- step timeline
@dataclass(frozen=True)
class StepSample:
    """One engine step (or two, `steps` = 2) seen on the client: duration, batch, what the profile says."""
    t_s: float            # when its tokens arrived (first receive)
    gap_s: float          # since the previous step's tokens
    model_s: float        # T_profile of its batch (sum over its steps)
    n_seqs: int           # sequences in it (summed over its steps)
    n_new: int            # requests whose first token it produced
    prefill_tokens: int   # prompt tokens it computed (prefix-cache hits excluded)
    steps: int = 1


def token_clusters(events: list[tuple], join_s: float = 0.0004) -> list[list]:
    """Engine steps of one worker from (receive time, request idx, token index) events: [t_first, t_last,
    {idx: token index}] per step. A step's tokens arrive together: a new step starts when the gap to the
    previous receive reaches `join_s` or a request repeats."""
    clusters: list[list] = []
    for t, idx, i in sorted(events):
        c = clusters[-1] if clusters else None
        if c is not None and t - c[1] < join_s and idx not in c[2]:
            c[1] = t
            c[2][idx] = i
        else:
            clusters.append([t, t, {idx: i}])
    return clusters


def report_events(report: dict) -> list[tuple]:
    """(receive time since the first send, request idx, token index) of every streamed token of a report."""
    recs = [r for r in report.get("requests", []) if r.get("status") == "ok" and r.get("token_times_s")]
    return [(r["arrival_s"] + (r.get("dispatch_lag_s") or 0.0) + t, r["idx"], i)
            for r in recs for i, t in enumerate(r["token_times_s"])]


def step_samples(report: dict, profile, join_s: float = 0.0004, token_budget: int | None = None) -> list[StepSample]:
    """Engine steps of a one-worker run, rebuilt from the per-chunk receive times (module docstring).

    With async scheduling the engine launches a step that admits a prompt (an eager prefill: ~7 ms of
    host launches) before it hands out the previous step's tokens, so those tokens arrive late and the
    admitting step's tokens right behind them: the stall lands in the gap *before* the previous
    step. A step that admits requests is therefore taken together with the step before it (one
    sample, `steps` = 2, its gap spanning both), and the decode-only samples stay clean; so is a step whose
    tokens came sooner than half its T_profile (the same pattern with no admission in sight). A prompt's
    prefill work is its tokens less its prefix-cache hits (`cached_tokens` of the record)."""
    budget = token_budget or profile.max_num_batched_tokens
    recs = [r for r in report.get("requests", []) if r.get("status") == "ok" and r.get("token_times_s")]
    events = []
    chunked = []                                      # (send, first token) of prompts longer than the budget
    isl, new_tok = {}, {}
    for r in recs:
        s0 = r["arrival_s"] + (r.get("dispatch_lag_s") or 0.0)
        isl[r["idx"]] = int(r["isl"])
        new_tok[r["idx"]] = max(1, int(r["isl"]) - int(r.get("cached_tokens") or 0))
        for i, t in enumerate(r["token_times_s"]):
            events.append((s0 + t, r["idx"], i))
        if new_tok[r["idx"]] > budget:
            chunked.append((s0, s0 + r["token_times_s"][0]))
    if not events:
        raise ValueError("the report has no per-token times (tandem bench records them for streamed requests)")
    clusters = token_clusters(events, join_s)
    chunked.sort()

    def model(ids: dict) -> tuple[float, int, int]:
        new = [k for k, i in ids.items() if i == 0]
        pf = sum(new_tok[k] for k in new)
        nd = len(ids) - len(new)
        ctx = sum(isl[k] + i for k, i in ids.items() if i > 0)
        xc = sum(profile.ctx_extra(isl[k] - new_tok[k], new_tok[k]) for k in new)
        return profile.step_time(nd, ctx, pf, xc), len(new), pf

    def hidden(t: float) -> bool:
        return any(s < t <= f + join_s for s, f in chunked)

    # per cluster: usable (busy since the previous one, no invisible chunk, prefill within budget),
    # gap, T_profile, new requests, prefill tokens, "behind" (it arrived right behind the previous one:
    # it admits a request, or it came sooner than half its own T_profile, which no real step does)
    info: list = [None]
    for j in range(1, len(clusters)):
        b = clusters[j]
        m, n_new, pf = model(b[2])
        gap = b[0] - clusters[j - 1][0]
        ok = bool(b[2].keys() & clusters[j - 1][2].keys()) and not hidden(b[0]) and pf <= budget
        info.append((ok, gap, m, n_new, pf, n_new > 0 or gap < 0.5 * m))
    out = []
    for j in range(1, len(clusters)):
        ok, gap, m, n_new, pf, behind = info[j]
        if not ok or (j + 1 < len(clusters) and info[j + 1][0] and info[j + 1][5]):
            continue                                   # unusable, or its gap holds the next step's stall
        b = clusters[j]
        if not behind:
            out.append(StepSample(b[0], gap, m, len(b[2]), 0, 0, 1))
            continue
        p = info[j - 1]
        if p is None or not p[0] or p[5]:
            continue                                   # no clean step before it (or two behind in a row)
        out.append(StepSample(b[0], p[1] + gap, p[2] + m, len(b[2]) + len(clusters[j - 1][2]), p[3] + n_new,
                              p[4] + pf, 2))
    return out


def _solve(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares by the normal equations (few columns; Gaussian elimination with pivoting)."""
    k = len(rows[0])
    m = [[sum(r[i] * r[j] for r in rows) for j in range(k)] + [sum(r[i] * y for r, y in zip(rows, ys))]
         for i in range(k)]
    for c in range(k):
        p = max(range(c, k), key=lambda i: abs(m[i][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-12:
            raise ValueError("degenerate fit: the run does not vary that term (e.g. always the same batch)")
        for i in range(k):
            if i != c:
                f = m[i][c] / m[c][c]
                m[i] = [x - f * y for x, y in zip(m[i], m[c])]
    return [m[i][k] / m[i][i] for i in range(k)]


def fit_step_overheads(samples: list[StepSample], new_per: str = "prefill_step") -> dict:
    """a, s, n (seconds) of `step = T_profile + a + s*n_seqs + n*n_new`, each from the steps that show it:
    a and s by least squares on the samples that admit nobody (a term that comes out negative is fixed at 0
    and the other refitted), then n as the mean of what the admitting samples add beyond
    T_profile + a*steps + s*n_seqs, per admitted request (0 if negative or none)."""
    dec = [x for x in samples if x.n_new == 0]          # stalls of no admission stay in a and s
    if len(dec) < 20:
        raise ValueError(f"only {len(dec)} busy decode-only engine steps in the run: too few to measure overheads")
    cols = {"step_s": lambda x: float(x.steps), "seq_s": lambda x: float(x.n_seqs)}
    active = list(cols)
    coef: dict = {}
    while active:
        try:
            coef = dict(zip(active, _solve([[cols[c](x) for c in active] for x in dec],
                                           [x.gap_s - x.model_s for x in dec])))
        except ValueError:
            if len(active) == 1:
                raise
            active = active[:1]                        # one batch size only: a alone
            continue
        neg = [c for c in active if coef[c] < 0]
        if not neg:
            break
        active = [c for c in active if c not in neg]
        coef = {}
    fit = {c: max(0.0, coef.get(c, 0.0)) for c in cols}
    base = lambda x: x.model_s + fit["step_s"] * x.steps + fit["seq_s"] * x.n_seqs   # noqa: E731
    adm = [x for x in samples if x.n_new]
    k = (lambda x: x.n_new) if new_per == "request" else (lambda x: 1)     # noqa: E731
    fit["new_s"] = max(0.0, sum((x.gap_s - base(x)) / k(x) for x in adm) / len(adm)) if adm else 0.0
    fit["new_per"] = new_per
    pred = [base(x) + fit["new_s"] * (k(x) if x.n_new else 0) for x in samples]
    fit["steps"] = len(samples)
    fit["decode_steps"] = len(dec)
    fit["admitting_samples"] = len(adm)
    fit["busy_s"] = sum(x.gap_s for x in samples)
    fit["profile_s"] = sum(x.model_s for x in samples)
    fit["resid_rms_s"] = (sum((x.gap_s - p) ** 2 for x, p in zip(samples, pred)) / len(samples)) ** 0.5
    return fit


def by_batch(samples: list[StepSample], fit: dict, width: int = 8) -> list[tuple]:
    """(batch bin, steps, real mean ms, profile mean ms, model mean ms) of the steps that admitted
    nobody: how well T_profile + a + s*b follows the real step time across batch sizes."""
    bins: dict[int, list] = {}
    for x in samples:
        if x.n_new == 0 and x.steps == 1:
            bins.setdefault(x.n_seqs // width * width, []).append(x)
    out = []
    for b in sorted(bins):
        v = bins[b]
        n = len(v)
        out.append((b, n, 1e3 * sum(x.gap_s for x in v) / n, 1e3 * sum(x.model_s for x in v) / n,
                    1e3 * sum(x.model_s + fit["step_s"] + fit["seq_s"] * x.n_seqs for x in v) / n))
    return out


def admission_quantiles(samples: list[StepSample], fit: dict, floor_s: float, points: int = 21,
                        min_steps: int = 20) -> list[float] | None:
    """Quantiles (p0..p100 in `points` steps) of the admission time n seen in admitting samples:
    gap - T_profile - a - s*n_seqs, floored at `floor_s`; None with fewer than `min_steps`. Per prefill
    step (`fit["new_per"]`, the default) every admitting sample is one prefill step, however many
    prompts it admits; per request only those that admitted one request count."""
    per_step = fit.get("new_per", "prefill_step") != "request"
    ex = sorted(max(floor_s, x.gap_s - x.model_s - fit["step_s"] * x.steps - fit["seq_s"] * x.n_seqs)
                for x in samples if x.n_new == 1 or (per_step and x.n_new))
    if len(ex) < min_steps:
        return None
    out = []
    for i in range(points):
        pos = i / (points - 1) * (len(ex) - 1)
        j = int(pos)
        out.append(ex[j] + (ex[j + 1] - ex[j]) * (pos - j) if j + 1 < len(ex) else ex[-1])
    return out


def worker_part(profile) -> dict | None:
    """The worker process's own share, measured in process by `tandem profile` (``worker_overhead``):
    a_w + s_w * b fitted to (WorkerCore.step - Engine.step) per batch, and the mean admission time.
    For comparison with what the real run's timeline says (the rest is frontend, GC, contention)."""
    wo = profile.raw.get("worker_overhead") if hasattr(profile, "raw") else None
    if not isinstance(wo, dict) or len(wo.get("batch") or []) < 2:
        return None
    rows = [[1.0, float(b)] for b in wo["batch"]]
    ys = [w - e for e, w in zip(wo["engine_step_s"], wo["worker_step_s"])]
    try:
        a, sq = _solve(rows, ys)
    except ValueError:
        return None
    adm = wo.get("admission_s") or []
    return {"step_s": a, "seq_s": sq, "admission_s": sum(adm) / len(adm) if adm else None}


# ----------------------------------------------------------------------------- calibrations
def calibrate_steps(real: dict, args, log=None, join_ms: float = 0.4) -> tuple[dict, dict, list]:
    """(serving overheads in seconds + fit info, sim report, history): method `steps`."""
    from tandem.sim.profile import SimProfile
    from tandem.sim.run import plan, simulate
    if isinstance(args.profile, str):
        args.profile = SimProfile.load(args.profile)
    prof = args.profile
    samples = step_samples(real, prof, join_ms / 1e3, args.max_num_batched_tokens)
    fit = fit_step_overheads(samples, getattr(args, "new_overhead_per", None) or "prefill_step")
    if log:
        log(f"{fit['steps']} busy samples ({fit['decode_steps']} decode-only steps, {fit['admitting_samples']} admitting "
            f"step pairs): real {fit['busy_s']:.2f} s, profile {fit['profile_s']:.2f} s -> "
            f"a {fit['step_s'] * 1e3:.3f} ms/step, s {fit['seq_s'] * 1e3:.4f} ms/seq, "
            f"n {fit['new_s'] * 1e3:.3f} ms/{'new request' if fit['new_per'] == 'request' else 'prefill step'} (residual rms {fit['resid_rms_s'] * 1e3:.2f} ms)")
    if log:
        log("decode-only steps by batch: " + "; ".join(
            f"b {b}-{b + 7}: {n} steps, real {r:.2f} ms, profile {p:.2f}, model {m:.2f}"
            for b, n, r, p, m in by_batch(samples, fit)))
    wp = worker_part(prof)
    if log and wp:
        log(f"of which the worker process, measured in process by tandem profile: "
            f"a_w {wp['step_s'] * 1e3:.3f} ms/step, s_w {wp['seq_s'] * 1e3:.4f} ms/seq, admission {(wp['admission_s'] or 0) * 1e3:.3f} ms/request")
    fit["worker_part"] = wp
    # admission time: its measured distribution (the TTFT tail lives there), else the fitted mean;
    # a prefill step is never charged less than half the profile's shortest prefill
    fit["new_q"] = admission_quantiles(samples, fit, -0.5 * min(prof.raw["prefill"]["time_s"]))
    if log and fit["new_q"]:
        q = fit["new_q"]
        log("admission time quantiles (ms) p0/p25/p50/p75/p90/p95/p100: " + " / ".join(
            f"{q[round(p * (len(q) - 1))] * 1e3:.2f}" for p in (0, .25, .5, .75, .9, .95, 1)))
    reqs, info = plan(args)
    args.step_overhead_ms, args.seq_overhead_ms = fit["step_s"] * 1e3, fit["seq_s"] * 1e3
    args.request_overhead_ms = 0.0
    if fit["new_q"]:
        args.new_overhead_ms = None                      # the profile's quantiles, set below
        args.profile = SimProfile(profile_with_overheads(prof, dict(fit, request_s=0.0), "calibration"),
                                  source=prof.source)
    else:
        args.new_overhead_ms = fit["new_s"] * 1e3
        args.new_overhead_per = fit["new_per"]
    hist = []
    ttft_r = _get(real["summary"]["overall"], "ttft_ms", "p50")
    if ttft_r is None:
        raise ValueError("the real report has no TTFT p50 (no successful requests?)")
    rep = None
    for i in range(3):                       # r shifts every TTFT equally: converges in one round
        rep, _ = simulate(args, reqs, info)
        ttft_s = _get(rep["summary"]["overall"], "ttft_ms", "p50")
        hist.append({"round": i, "request_overhead_ms": round(args.request_overhead_ms, 4), "ttft_p50_ms": ttft_s})
        d = ttft_r - ttft_s
        if abs(d) <= 0.005 * ttft_r or (d < 0 and args.request_overhead_ms <= 0.0):
            break
        args.request_overhead_ms = max(0.0, args.request_overhead_ms + d)
    fit["request_s"] = args.request_overhead_ms / 1e3
    if log:
        log(f"r {args.request_overhead_ms:.3f} ms/request (TTFT p50 {ttft_r:.2f} real)")
    return fit, rep, hist


def calibrate(real: dict, args, rounds: int = 8, tol: float = 0.02, damping: float = 0.8,
              log=None) -> tuple[float, float, dict, list]:
    """Method `p50`: (step_overhead_ms, request_overhead_ms, sim report, history) fitted to `real`."""
    from tandem.sim.profile import SimProfile
    from tandem.sim.run import plan, simulate
    if isinstance(args.profile, str):
        args.profile = SimProfile.load(args.profile)
    reqs, info = plan(args)
    want = real["summary"]["overall"]
    tpot_r, ttft_r = _get(want, "tpot_ms", "p50"), _get(want, "ttft_ms", "p50")
    if tpot_r is None or ttft_r is None:
        raise ValueError("the real report has no TTFT/TPOT p50 (no successful multi-token requests?)")
    s, r = float(args.step_overhead_ms or 0.0), float(args.request_overhead_ms or 0.0)
    args.seq_overhead_ms = args.seq_overhead_ms or 0.0
    args.new_overhead_ms = args.new_overhead_ms or 0.0
    hist = []
    rep = None
    for i in range(rounds):
        args.step_overhead_ms, args.request_overhead_ms = s, r
        rep, _ = simulate(args, reqs, info)
        got = rep["summary"]["overall"]
        tpot_s, ttft_s = _get(got, "tpot_ms", "p50"), _get(got, "ttft_ms", "p50")
        hist.append({"round": i, "step_overhead_ms": round(s, 4), "request_overhead_ms": round(r, 4),
                     "tpot_p50_ms": tpot_s, "ttft_p50_ms": ttft_s})
        if log:
            log(f"round {i}: step +{s:.3f} ms, request +{r:.3f} ms -> TPOT p50 {tpot_s:.2f} "
                f"(real {tpot_r:.2f}), TTFT p50 {ttft_s:.2f} (real {ttft_r:.2f})")
        d_tpot, d_ttft = tpot_r - tpot_s, ttft_r - ttft_s
        if abs(d_tpot) <= tol * tpot_r and abs(d_ttft) <= tol * ttft_r:
            break
        if abs(d_tpot) > tol * tpot_r:
            s = max(0.0, s + damping * d_tpot)
        else:
            r = max(0.0, r + damping * d_ttft)
    return s, r, rep, hist


def profile_with_overheads(profile, overheads: dict, source: str) -> dict:
    """The profile's JSON with a ``serving_overhead`` section (seconds)."""
    d = dict(profile.to_dict())
    d["serving_overhead"] = {k: round(float(overheads.get(k, 0.0)), 7)
                             for k in ("step_s", "seq_s", "new_s", "request_s")}
    q = overheads.get("new_q")
    d["serving_overhead"]["new_q"] = [round(float(x), 7) for x in q] if q else None
    d["serving_overhead"]["new_per"] = overheads.get("new_per") or "request"
    d["serving_overhead"]["source"] = source
    return d


def main(argv=None) -> int:
    from tandem.sim.cli import add_arguments
    p = argparse.ArgumentParser(prog="python -m tandem.sim.calibrate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, metavar="REAL.json", help="the tandem bench report of the real run")
    p.add_argument("--method", choices=("steps", "p50"), default="steps",
                   help="steps: measure the step terms on the run's token timeline (default); p50: match medians")
    p.add_argument("--join-ms", type=float, default=0.4,
                   help="steps: receive times closer than this belong to the same engine step")
    p.add_argument("--write-profile", metavar="PROFILE.json", default=None,
                   help="save the profile with the measured serving_overhead section")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tol", type=float, default=0.02, help="p50: relative gap accepted on TPOT/TTFT p50")
    add_arguments(p)
    args = p.parse_args(argv)
    with open(args.real, encoding="utf-8") as f:
        real = json.load(f)
    args.quiet = True
    log = lambda m: print(m, file=sys.stderr)   # noqa: E731
    try:
        if args.method == "steps":
            fit, rep, hist = calibrate_steps(real, args, log=log, join_ms=args.join_ms)
        else:
            s, r, rep, hist = calibrate(real, args, rounds=args.rounds, tol=args.tol, log=log)
            fit = {"step_s": s / 1e3, "seq_s": 0.0, "new_s": 0.0, "request_s": r / 1e3}
    except ValueError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    from tandem.bench.report import write_report
    rep["config"]["sim"]["calibration"] = {"real": args.real, "method": args.method, "fit": fit, "history": hist}
    write_report(args.out, rep)
    if args.write_profile:
        d = profile_with_overheads(args.profile, fit, f"python -m tandem.sim.calibrate --method {args.method} "
                                                      f"--real {args.real}")
        with open(args.write_profile, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=1)
    print(f"--step-overhead-ms {fit['step_s'] * 1e3:.3f} --seq-overhead-ms {fit['seq_s'] * 1e3:.4f} "
          + (f"--new-overhead-ms {fit['new_s'] * 1e3:.3f} " if not fit.get("new_q") else "")
          + f"--request-overhead-ms {fit['request_s'] * 1e3:.3f}"
          + ("  (admission time: its measured quantiles, in the --write-profile output)" if fit.get("new_q") else ""))
    print(table(real, rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
