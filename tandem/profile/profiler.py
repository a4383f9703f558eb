"""Build a `Profile` by measuring a model on this GPU (what `tandem profile` runs)."""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass

from tandem.profile.schema import MIXED_MODELS, Profile, find_knee


@dataclass
class ProfilePlan:
    prefill_tokens: tuple = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    ctx_cached: tuple = (0, 1024, 2048, 4096, 8192, 16384)
    ctx_new_tokens: int = 512
    decode_batches: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    decode_contexts: tuple = (256, 1024, 2048, 4096, 8192)
    decode_steps: int = 10
    mixed_points: tuple = ((512, 32, 1024), (2048, 64, 2048), (128, 16, 4096), (1024, 128, 1024), (256, 256, 512))
    repeats: int = 3

    @classmethod
    def quick(cls) -> "ProfilePlan":
        return cls(prefill_tokens=(128, 512, 2048, 8192), ctx_cached=(0, 2048, 8192),
                   decode_batches=(1, 8, 32, 128), decode_contexts=(256, 1024, 4096), decode_steps=5,
                   mixed_points=((512, 32, 1024), (128, 8, 4096)), repeats=2)

    @property
    def max_model_len(self) -> int:
        return max(max(self.prefill_tokens), max(self.ctx_cached) + self.ctx_new_tokens,
                   max(self.decode_contexts) + 64) + 256

    @property
    def max_batch(self) -> int:
        return max(max(self.decode_batches), max(p[1] for p in self.mixed_points) + 1)


def engine_config_for(model_dir: str, plan: ProfilePlan, **overrides) -> dict:
    kw = dict(model=str(model_dir), device="cuda", dtype="bfloat16", max_num_seqs=plan.max_batch,
              max_num_batched_tokens=max(max(plan.prefill_tokens), max(p[0] + p[1] for p in plan.mixed_points)),
              max_model_len=plan.max_model_len, gpu_memory_utilization=0.9, enable_prefix_caching=True)
    kw.update(overrides)
    return kw


def _extrapolate_rows(contexts, rows):
    """Fill None entries of each batch row linearly in context from that row's measured points (or,
    with fewer than 2, by scaling the previous row)."""
    filled, flags = [], []
    prev = None
    for row in rows:
        pts = [(c, t) for c, t in zip(contexts, row) if t is not None]
        out, fl = [], []
        for j, (c, t) in enumerate(zip(contexts, row)):
            if t is not None:
                out.append(t)
                fl.append(False)
                continue
            if len(pts) >= 2:
                (c0, t0), (c1, t1) = pts[-2], pts[-1]
                out.append(t1 + (t1 - t0) * (c - c1) / (c1 - c0))
            elif pts and prev is not None:
                c0, t0 = pts[-1]
                k = contexts.index(c0)
                out.append(t0 * prev[j] / prev[k] if prev[k] else t0)
            elif prev is not None:
                out.append(prev[j] * 2)
            else:
                out.append(float("nan"))
            fl.append(True)
        filled.append(out)
        flags.append(fl)
        prev = out
    return filled, flags


def profile_engine(engine, plan: ProfilePlan, *, model: str, preset: str | None, command: str,
                   weight_load_s: float, worker_start_s: float, copy_gbps: float, mm_tflops: float,
                   log=print) -> Profile:
    import torch

    from tandem.profile.measure import EngineProbe, kv_bytes_per_token
    probe = EngineProbe(engine)
    mc = engine.model_config
    t_all = time.perf_counter()

    # prefill vs prompt tokens (one fresh prompt, no cache)
    pf_tokens, pf_times = [], []
    for n in plan.prefill_tokens:
        if n + 1 > engine.max_model_len:
            continue
        t = probe.prefill_time(n, repeats=plan.repeats)
        pf_tokens.append(n)
        pf_times.append(t)
        log(f"  prefill {n:6d} tok: {t * 1e3:8.2f} ms  ({n / t:9.0f} tok/s)")
    knee = find_knee(pf_tokens, pf_times)

    # prefill chunk of ctx_new_tokens on top of a cached prefix
    new = plan.ctx_new_tokens
    c_tokens, c_times = [], []
    bs = engine.config.block_size
    for c in plan.ctx_cached:
        c = (c // bs) * bs
        if c + new + 1 > engine.max_model_len:
            continue
        prefix = probe.random_ids(c) if c else None
        t = probe.prefill_time(new, prefix=prefix, repeats=plan.repeats)
        c_tokens.append(c)
        c_times.append(t)
        log(f"  prefill {new} new on {c:6d} cached: {t * 1e3:8.2f} ms")

    # decode step vs batch and context
    rows = []
    for b in plan.decode_batches:
        row = []
        for c in plan.decode_contexts:
            if not probe.fits(b, c, extra=plan.decode_steps + 16):
                row.append(None)
                continue
            r = probe.decode_step_time(b, c, steps=plan.decode_steps, warmup=2)
            row.append(r["step_s"])
            log(f"  decode b={b:4d} ctx={c:6d}: step {r['step_s'] * 1e3:7.3f} ms"
                + (f" (GPU {r['gpu_s'] * 1e3:7.3f} ms)" if r["gpu_s"] else ""))
        rows.append(row)
    times, flags = _extrapolate_rows(list(plan.decode_contexts), rows)

    prof = Profile(
        model=model, preset=preset, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", dtype=str(engine.runner.dtype).replace(
            "torch.", ""), date=_dt.date.today().isoformat(), command=command, block_size=bs,
        kv_capacity_tokens=probe.kv_capacity_tokens(), max_num_batched_tokens=knee,
        prefill={"tokens": pf_tokens, "time_s": pf_times},
        prefill_ctx={"cached_tokens": c_tokens, "new_tokens": new, "time_s": c_times},
        decode={"batch": list(plan.decode_batches), "context": list(plan.decode_contexts), "time_s": times},
        weight_load_s=weight_load_s, worker_start_s=worker_start_s, role_flip_s=None,
        kv_bytes_per_token=kv_bytes_per_token(mc, torch.tensor([], dtype=engine.runner.dtype).element_size()),
        copy_bandwidth_gbps=copy_gbps, matmul_tflops=mm_tflops)
    if any(any(f) for f in flags):
        prof.extra["decode_extrapolated"] = flags

    # mixed steps: which simple model predicts them best
    checks = []
    for p_tok, d_b, d_c in plan.mixed_points:
        if not probe.fits(d_b, d_c, extra=64) or p_tok + d_b > engine.config.max_num_batched_tokens:
            continue
        t = probe.mixed_step_time(p_tok, d_b, d_c, repeats=plan.repeats)
        pred = {m: prof.mixed_step_time(p_tok, 0, d_b, d_c, model=m) for m in MIXED_MODELS}
        checks.append({"prefill_tokens": p_tok, "decode_batch": d_b, "decode_ctx": d_c, "measured_s": t,
                       "predicted_s": pred})
        log(f"  mixed P={p_tok} D={d_b}@{d_c}: {t * 1e3:.2f} ms; "
            + ", ".join(f"{m} {v * 1e3:.2f}" for m, v in pred.items()))
    if checks:
        err = {m: sum(abs(c["predicted_s"][m] - c["measured_s"]) / c["measured_s"] for c in checks) / len(checks)
               for m in MIXED_MODELS}
        best = min(err, key=err.get)
        prof.extra["mixed_model"] = best
        prof.extra["mixed_check"] = {"points": checks, "mean_abs_rel_err": err}
        log(f"  mixed-step model errors: {err} -> {best}")
    try:                          # the worker's own host time (informational; the sim's knobs come from
        wo = probe.worker_overhead()  # python -m tandem.sim.calibrate on a real run)
        prof.extra["worker_overhead"] = wo
        log("  worker adds per decode step: " + ", ".join(
            f"b={b} {(w - e) * 1e3:.3f} ms" for b, e, w in zip(wo["batch"], wo["engine_step_s"], wo["worker_step_s"]))
            + "; admission: " + ", ".join(f"{n} tok {t * 1e3:.2f} ms" for n, t in zip(wo["admission_tokens"],
                                                                                   wo["admission_s"])))
    except Exception as e:  # noqa: BLE001 - optional measurement (e.g. pyzmq missing)
        log(f"  worker overhead not measured: {type(e).__name__}: {e}")
    prof.extra["profile_s"] = time.perf_counter() - t_all
    return prof


def profile_cpu(model_dir: str, out: str, plan: ProfilePlan, *, command: str, max_num_seqs: int,
                max_model_len: int) -> str:
    """Measure a (tiny) model on the CPU with the same code as `tandem profile` (which is GPU-only) and save
    it to `out`: the real profile the planner's CPU tests and smoke runs load. The copy bandwidth and matmul
    ceilings are placeholders (10 GB/s, 0.1 TFLOP/s), not measured."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import Engine
    t = time.perf_counter()
    eng = Engine(EngineConfig(model_dir, device="cpu", max_num_seqs=max_num_seqs, max_model_len=max_model_len))
    p = profile_engine(eng, plan, model=model_dir, preset="tiny", command=command,
                       weight_load_s=0.1, worker_start_s=time.perf_counter() - t, copy_gbps=10.0, mm_tflops=0.1,
                       log=lambda s: None)
    p.save(str(out))
    return str(out)


def profile_model(model_dir: str, out: str | None = None, *, preset: str | None = None, quick: bool = False,
                  command: str = "", log=print, **engine_overrides) -> Profile:
    """Load the model into a fresh engine on this GPU, measure, and (optionally) save the profile."""
    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import Engine
    from tandem.profile.measure import copy_bandwidth_gbps, matmul_tflops, timed_load
    if not torch.cuda.is_available():
        raise RuntimeError("tandem profile needs a CUDA GPU")
    plan = ProfilePlan.quick() if quick else ProfilePlan()
    copy_gbps, mm = copy_bandwidth_gbps(), matmul_tflops()
    log(f"ceilings: copy {copy_gbps:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s")
    with timed_load() as took:
        t0 = time.perf_counter()
        engine = Engine(EngineConfig(**engine_config_for(model_dir, plan, **engine_overrides)))
        torch.cuda.synchronize()
        start = time.perf_counter() - t0
    log(f"worker start {start:.1f}s (weights {took[0] if took else float('nan'):.1f}s)")
    prof = profile_engine(engine, plan, model=str(model_dir), preset=preset, command=command,
                          weight_load_s=took[0] if took else start, worker_start_s=start, copy_gbps=copy_gbps,
                          mm_tflops=mm, log=log)
    if out:
        prof.save(out)
    return prof
