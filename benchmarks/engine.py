"""Engine speed on one GPU, against ceilings measured in the same run (run through the device tool:
see benchmarks/run_engine_gpu.sh and docs/benchmarks.md).

    python3 benchmarks/engine.py kernels [--out DIR]            # kernel checks + microbenchmarks + tuning sweep
    python3 benchmarks/engine.py bench --presets llama-3.2-1b,llama-3.1-8b [--profile-dir DIR] [--hf] [--out DIR]

`bench` prints one table per preset:
  decode tok/s at batch 1/8/32/128/256 x context 1k/4k (+ batch 64 at 2k), through the real engine
    (scheduler, CUDA-graph decode, sampler, detokenizer), each point twice: with asynchronous scheduling
    (steps launched ahead; the table's main columns) and with synchronous steps (`sync`); roofline =
    (weights + KV bytes per step) / measured copy bandwidth; `gpu` = the same step's graph replay alone;
  prefill tok/s for one prompt of 512/2k/8k tokens; roofline = FLOPs / measured bf16 matmul rate;
  engine vs HF transformers `generate` at batch 1 and 32 (128 prompt + 128 new tokens), same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tandem.profile.measure import (EngineProbe, copy_bandwidth_gbps, decode_weight_bytes,  # noqa: E402
                                    kv_bytes_per_token, matmul_tflops, prefill_flops, time_cuda, timed_load)

OUT = Path(os.environ.get("OUT", "out"))


def log(*a):
    print(*a, flush=True)


def save(name: str, obj) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(obj, indent=1, default=str) + "\n")


# =========================================================================== kernels
def cmd_kernels(args) -> int:
    from tandem.engine import kernels as K
    from tandem.engine import model as M
    from tandem.engine import triton_attention as ta
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
    from test_triton_attention import make_batch, rel_err  # noqa: E402
    from tandem.engine.attention import paged_attention_ref

    res = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat()}
    bw = copy_bandwidth_gbps()
    mm = matmul_tflops()
    res["copy_gbps"], res["matmul_tflops"] = bw, mm
    log(f"ceilings: copy {bw:.0f} GB/s (read+write), bf16 matmul {mm:.0f} TFLOP/s")

    # ---- decode attention: bandwidth vs configs
    def decode_case(B, ctx, hq, hkv, d, seed=0):
        q, kv, meta = make_batch([(1, ctx)] * B, hq, hkv, d, seed=seed, num_blocks=B * (-(-ctx // 16)) + 8)
        return q, kv, meta, B * ctx * hkv * d * 2 * 2

    dec_cfgs = [(64, 4, 3), (64, 4, 2), (64, 4, 4), (32, 4, 3), (128, 4, 3), (128, 8, 3), (64, 2, 3), (64, 8, 3),
                (128, 4, 2)]
    if args.quick:
        dec_cfgs = [(64, 4, 3), (64, 4, 2), (128, 8, 3), (32, 4, 3), (128, 4, 2)]
    sweep = []
    for (B, ctx, hq, hkv, d) in [(64, 2048, 32, 8, 128), (1, 4096, 32, 8, 128), (256, 1024, 32, 8, 64)]:
        q, kv, meta, nbytes = decode_case(B, ctx, hq, hkv, d)
        ref = paged_attention_ref(q, kv, meta, d ** -0.5)
        for tn, nw, ns in dec_cfgs:
            cfg = {"tile_n": tn, "num_warps": nw, "num_stages": ns}
            out = torch.full_like(q, float("nan"))
            try:
                ta.paged_attention(q, kv, meta, d ** -0.5, out=out, cfg=cfg)
                err = rel_err(out, ref)
                t = time_cuda(lambda: ta.paged_attention(q, kv, meta, d ** -0.5, out=out, cfg=cfg), iters=20, graph=args.graph)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                log(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            sweep.append({"B": B, "ctx": ctx, "shape": (hq, hkv, d), "cfg": cfg, "us": t * 1e6,
                          "gbps": nbytes / t / 1e9, "err": err})
            log(f"  decode sweep B={B:3d} ctx={ctx:5d} d={d:3d} tile={tn:3d} w={nw} s={ns}: {t * 1e6:8.1f} us "
                f"{nbytes / t / 1e9:6.0f} GB/s err {err:.1e}")
        del q, kv, meta
    res["decode_sweep"] = sweep

    # ---- decode attention at the default config, table of shapes (+ segments sweep at small batch)
    rows = []
    for (hq, hkv, d) in [(32, 8, 128), (32, 8, 64)]:
        for B, ctx in [(1, 1024), (1, 4096), (8, 4096), (32, 1024), (32, 4096), (64, 2048), (128, 1024),
                       (256, 1024), (256, 4096)]:
            q, kv, meta, nbytes = decode_case(B, ctx, hq, hkv, d, seed=B + ctx)
            ref = paged_attention_ref(q, kv, meta, d ** -0.5)
            out = torch.full_like(q, float("nan"))
            ta.paged_attention(q, kv, meta, d ** -0.5, out=out)
            err = rel_err(out, ref)
            assert torch.isfinite(out).all() and err < 2e-2, err
            nseg = ta.num_decode_segments(B, hkv, q.device)
            t = time_cuda(lambda: ta.paged_attention(q, kv, meta, d ** -0.5, out=out), iters=20, graph=args.graph)
            alt = {}
            if B <= 32:
                for s in (1, 4, 8, 16, 32):
                    alt[s] = time_cuda(lambda: ta.paged_attention(q, kv, meta, d ** -0.5, out=out, num_segments=s),
                                       iters=10, graph=args.graph) * 1e6
            rows.append({"shape": (hq, hkv, d), "B": B, "ctx": ctx, "nseg": nseg, "us": t * 1e6,
                         "gbps": nbytes / t / 1e9, "frac_copy_bw": nbytes / t / 1e9 / bw, "err": err,
                         "us_by_segments": alt})
            log(f"  decode attn {hq}/{hkv}/{d} B={B:3d} ctx={ctx:5d} nseg={nseg:2d}: {t * 1e6:8.1f} us "
                f"{nbytes / t / 1e9:6.0f} GB/s ({nbytes / t / 1e9 / bw:.2f} of copy) err {err:.1e} "
                + (" seg:" + " ".join(f"{k}:{v:.0f}" for k, v in alt.items()) if alt else ""))
            del q, kv, meta
    res["decode"] = rows

    # ---- prefill attention: TFLOP/s vs configs, and torch SDPA (flash, contiguous) for reference
    pre_cfgs = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 2),
                (64, 128, 4, 2), (128, 64, 4, 2)]
    if args.quick:
        pre_cfgs = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)]
    pre = []
    for specs, label in [([(2048, 2048)], "2k"), ([(8192, 8192)], "8k"), ([(512, 8192)], "512 on 7.7k cached"),
                         ([(1024, 1024)] * 4, "4x1k")]:
        hq, hkv, d = 32, 8, 128
        q, kv, meta = make_batch(specs, hq, hkv, d, seed=len(specs))
        flops = sum(4 * hq * d * (ql * (s - ql) + ql * (ql + 1) / 2) for ql, s in specs)
        ref = paged_attention_ref(q, kv, meta, d ** -0.5)
        for bm, tn, nw, ns in pre_cfgs:
            cfg = {"block_m": bm, "tile_n": tn, "num_warps": nw, "num_stages": ns}
            out = torch.full_like(q, float("nan"))
            try:
                ta.paged_attention(q, kv, meta, d ** -0.5, out=out, cfg=cfg)
                err = rel_err(out, ref)
                t = time_cuda(lambda: ta.paged_attention(q, kv, meta, d ** -0.5, out=out, cfg=cfg), iters=10,
                              graph=args.graph)
            except Exception as e:
                log(f"  cfg {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            pre.append({"case": label, "cfg": cfg, "us": t * 1e6, "tflops": flops / t / 1e12, "err": err})
            log(f"  prefill attn {label:20s} bm={bm:3d} tn={tn:3d} w={nw} s={ns}: {t * 1e3:7.3f} ms "
                f"{flops / t / 1e12:6.1f} TFLOP/s err {err:.1e}")
        if len(specs) == 1 and specs[0][0] == specs[0][1]:
            n = specs[0][0]
            qs = torch.randn(1, hq, n, d, dtype=torch.bfloat16, device="cuda")
            ks = torch.randn(1, hkv, n, d, dtype=torch.bfloat16, device="cuda")
            vs = torch.randn(1, hkv, n, d, dtype=torch.bfloat16, device="cuda")
            f = torch.nn.functional.scaled_dot_product_attention
            t = time_cuda(lambda: f(qs, ks, vs, is_causal=True, enable_gqa=True), iters=10, graph=args.graph)
            pre.append({"case": label, "cfg": "torch sdpa (contiguous, not paged)", "us": t * 1e6,
                        "tflops": flops / t / 1e12})
            log(f"  prefill attn {label:20s} torch SDPA contiguous: {t * 1e3:7.3f} ms {flops / t / 1e12:6.1f} TFLOP/s")
        del q, kv, meta
    res["prefill"] = pre

    # ---- fused element-wise kernels vs the torch ops they replace
    fused = []
    for T in (1, 64, 2048, 8192):
        H, I = 4096, 14336
        x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
        r = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(H, dtype=torch.bfloat16, device="cuda")
        gu = torch.randn(T, 2 * I, dtype=torch.bfloat16, device="cuda")
        qkv = torch.randn(T, (32 + 16) * 128, dtype=torch.bfloat16, device="cuda")
        q, k, v = qkv.split([4096, 1024, 1024], dim=-1)
        q, k, v = q.view(T, 32, 128), k.view(T, 8, 128), v.view(T, 8, 128)
        kvl = torch.randn(2, T // 16 + 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
        slots = torch.randperm(kvl.shape[1] * 16, device="cuda")[:T]
        pos = torch.arange(T, device="cuda") + 100
        inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
        cos, sin = M.rotary_cos_sin(pos, inv)
        from tandem.engine.attention import write_kv

        def torch_rope():
            qq, kk = M.apply_rotary(q, cos, sin), M.apply_rotary(k, cos, sin)
            write_kv(kvl, kk, v, slots)
        cases = {
            "add_rms_norm": (lambda: M.add_rms_norm(x, r, w, 1e-5), lambda: K.add_rms_norm(x, r, w, 1e-5),
                             3 * T * H * 2),
            "silu_and_mul": (lambda: M.silu_and_mul(gu), lambda: K.silu_and_mul(gu), 3 * T * I * 2),
            "rope+kv write": (torch_rope, lambda: K.rope_and_cache(q, k, v, cos, sin, kvl, slots),
                              T * (2 * 4096 + 4 * 1024) * 2),
        }
        for name, (ft, fk, nbytes) in cases.items():
            tt = time_cuda(ft, iters=20, graph=args.graph)
            tk = time_cuda(fk, iters=20, graph=args.graph)
            fused.append({"op": name, "T": T, "torch_us": tt * 1e6, "fused_us": tk * 1e6, "speedup": tt / tk,
                          "fused_gbps": nbytes / tk / 1e9})
            log(f"  {name:14s} T={T:5d}: torch {tt * 1e6:8.1f} us  fused {tk * 1e6:8.1f} us  x{tt / tk:5.1f}  "
                f"({nbytes / tk / 1e9:5.0f} GB/s)")
    res["fused"] = fused
    save("kernels.json", res)
    return 0


# =========================================================================== trace
def _category(name: str) -> str:
    n = name.lower()
    for key, cat in (("_paged_attn", "attention"), ("_merge_segments", "attention merge"), ("_rms_norm", "rmsnorm"),
                     ("_rope_cache", "rope+kv write"), ("_silu_mul", "silu*mul"), ("_write_kv", "kv write")):
        if key in n:
            return cat
    if any(k in n for k in ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk", "cublas")):
        return "matmul (cuBLAS)"
    if any(k in n for k in ("index", "embedding", "gather", "scatter")):
        return "index/gather (torch)"
    if any(k in n for k in ("elementwise", "reduce", "cat", "copy", "fill")):
        return "elementwise (torch)"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    return "other"


def kernel_breakdown(fn, n: int = 5) -> dict:
    """Per-category device time per call of fn (CUPTI through torch.profiler), and kernels per call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    cats: dict[str, float] = {}
    count = 0
    top = []
    from torch.autograd import DeviceType
    for e in prof.key_averages():
        if getattr(e, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue                                   # only kernel / memcpy events (no CPU ops)
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if not t:
            continue
        c = _category(e.key)
        cats[c] = cats.get(c, 0.0) + t / n / 1e6
        count += e.count
        top.append((t / n, e.key[:90], e.count / n))
    top.sort(reverse=True)
    return {"by_category_s": cats, "kernels_per_call": count / n, "kernel_sum_s": sum(cats.values()),
            "top": [{"us": u, "name": k, "per_call": c} for u, k, c in top[:12]]}


def cmd_trace(args) -> int:
    from tandem import LLM
    from tandem.model.init import init_model
    points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",")]
    bw = copy_bandwidth_gbps() * 1e9
    res = {"device": torch.cuda.get_device_name(), "copy_gbps": bw / 1e9, "presets": {}}
    for preset in args.presets.split(","):
        d = Path(args.models_dir) / preset
        if not (d / "config.json").exists():
            init_model(d, preset, dtype="bfloat16", device="cuda", overwrite=True)
        out = res["presets"][preset] = {}
        for fused in ("on", "off"):
            os.environ["TANDEM_DISABLE_FUSED"] = "0" if fused == "on" else "1"
            llm = LLM(str(d), device="cuda", dtype="bfloat16", max_num_seqs=64, max_model_len=8192,
                      max_num_batched_tokens=4096, gpu_memory_utilization=0.9)
            eng = llm.engine
            probe = EngineProbe(eng)
            engine_generate_tps(llm, 2, prompt=64, new=8)
            wbytes = decode_weight_bytes(eng.runner.model)
            kvb = kv_bytes_per_token(eng.model_config)
            gr = eng.runner.graphs
            for b, c in points:
                probe.start_decode(b, c, max_tokens=16)
                for _ in range(3):
                    eng.step()
                g = gr.graphs[gr.bucket_for(b)]
                gpu_s = time_cuda(g.replay, iters=20)
                br = kernel_breakdown(g.replay)
                probe.clear()
                roof = (wbytes + b * (c + 3) * kvb) / bw
                mm = br["by_category_s"].get("matmul (cuBLAS)", 0.0)
                rec = {"batch": b, "ctx": c, "gpu_s": gpu_s, "roofline_s": roof, "ratio_gpu": roof / gpu_s,
                       "matmul_effective_gbps": wbytes / mm / 1e9 if mm else None,
                       "gaps_s": gpu_s - br["kernel_sum_s"], **br}
                out[f"decode b={b} ctx={c} fused={fused}"] = rec
                log(f"== {preset} decode b={b} ctx={c} fused kernels {fused}: GPU step {gpu_s * 1e3:.3f} ms "
                    f"(roofline {roof * 1e3:.3f}, ratio {roof / gpu_s:.2f}); {br['kernels_per_call']:.0f} kernels; "
                    f"kernel sum {br['kernel_sum_s'] * 1e3:.3f} ms; gaps {(gpu_s - br['kernel_sum_s']) * 1e3:.3f} ms; "
                    f"matmul effective {rec['matmul_effective_gbps'] or 0:.0f} GB/s")
                for k, v in sorted(br["by_category_s"].items(), key=lambda x: -x[1]):
                    log(f"     {k:22s} {v * 1e3:8.3f} ms  {v / gpu_s * 100:5.1f}%")
            # eager prefill: GPU kernel time vs wall (launch-bound at small prompts)
            from tandem import SamplingParams
            for n in (512, 2048):
                def one(n=n):                            # a fresh random prompt: no prefix-cache hit
                    rid = probe.rid("tr")
                    eng.add_request(rid, probe.random_ids(n), SamplingParams(temperature=0, max_tokens=1,
                                                                             ignore_eos=True))
                    while rid in eng.requests:
                        eng.step()
                    probe.clear()
                one()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                one()
                wall = time.perf_counter() - t0
                br = kernel_breakdown(one, n=3)
                out[f"prefill {n} fused={fused}"] = {"wall_s": wall, **br}
                log(f"== {preset} prefill {n} fused {fused}: wall {wall * 1e3:.2f} ms, GPU kernels "
                    f"{br['kernel_sum_s'] * 1e3:.2f} ms ({br['kernels_per_call']:.0f} kernels)")
            save("trace.json", res)
            g = one = None
            del probe, eng, llm, gr, g, one
            gc.collect()
            torch.cuda.empty_cache()
    os.environ.pop("TANDEM_DISABLE_FUSED", None)
    save("trace.json", res)
    return 0


# =========================================================================== bench
DECODE_POINTS = [(b, c) for c in (1024, 4096) for b in (1, 8, 32, 128, 256)] + [(64, 2048)]
PREFILL_POINTS = (512, 2048, 8192)


def hf_generate_tps(model_dir: str, batch: int, prompt: int = 128, new: int = 128) -> float:
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    vocab = m.config.vocab_size
    res = {}
    for b in ([batch] if isinstance(batch, int) else batch):
        ids = torch.randint(1000, min(vocab, 100000), (b, prompt), device="cuda")
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            m.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            torch.cuda.synchronize()
            dt_ = time.perf_counter() - t0
        n = (out.shape[1] - prompt) * b
        res[b] = n / dt_
        log(f"  HF generate b={b:3d}: {n / dt_:8.1f} tok/s ({dt_:.2f}s)")
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return res


def engine_generate_tps(llm, batch: int, prompt: int = 128, new: int = 128, seed: int = 0) -> float:
    from tandem import SamplingParams
    g = torch.Generator().manual_seed(seed)
    vocab = llm.engine.model_config.vocab_size
    ps = [torch.randint(1000, min(vocab, 100000), (prompt,), generator=g).tolist() for _ in range(batch)]
    warm = torch.randint(1000, min(vocab, 100000), (prompt,), generator=g).tolist()
    llm.generate([warm], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    dt_ = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return n / dt_


def bench_preset(preset: str, args, ceil: dict, models_dir: Path) -> dict:
    from tandem import LLM
    from tandem.model.init import init_model
    d = models_dir / preset
    t0 = time.perf_counter()
    if not (d / "config.json").exists():
        init_model(d, preset, dtype="bfloat16", device="cuda", overwrite=True)
    init_s = time.perf_counter() - t0
    log(f"== {preset}: model dir ready in {init_s:.1f}s")
    from tandem.profile.profiler import ProfilePlan, engine_config_for
    plan = ProfilePlan.quick() if args.quick else ProfilePlan()
    kw = engine_config_for(str(d), plan)
    kw.pop("model")
    kw["max_num_seqs"] = max(kw["max_num_seqs"], 256)
    with timed_load() as took:
        t0 = time.perf_counter()
        llm = LLM(str(d), **kw)
        torch.cuda.synchronize()
        start_s = time.perf_counter() - t0
    eng = llm.engine
    mc = eng.model_config
    graphs = eng.runner.graphs
    log(f"engine up in {start_s:.1f}s (weights {took[0]:.1f}s, graphs {graphs.capture_s if graphs else 0:.1f}s); "
        f"KV {eng.kv.pool.num_blocks * eng.kv.block_size} tokens")
    gemv_rows = [dataclasses.asdict(c) for c in eng.runner.gemv_choices]
    for c in gemv_rows:
        log(f"  gemv {c['role']} [{c['n']} x {c['k']}]: unfused {c['unfused_us']:.1f} us/layer, triton "
            f"{c['best']} {c['best_us']:.1f} us -> {'triton' if c['chosen'] else 'unfused'}; tried " + ", ".join(
                f"{t['block_n']}x{t['block_k']}/w{t['num_warps']}/s{t['num_stages']} {us}" for t, us in c['tried'] or []))
    probe = EngineProbe(eng)
    engine_generate_tps(llm, 4, prompt=64, new=16)        # warm every path once (lazy module loads)
    wbytes = decode_weight_bytes(eng.runner.model)
    kvb = kv_bytes_per_token(mc)
    bw = ceil["copy_gbps"] * 1e9
    out = {"preset": preset, "model_init_s": init_s, "worker_start_s": start_s, "weight_load_s": took[0],
           "graph_capture_s": graphs.capture_s if graphs else None, "weight_bytes": wbytes,
           "kv_bytes_per_token": kvb, "kv_capacity_tokens": probe.kv_capacity_tokens(), "decode": [], "prefill": [],
           "gemv": gemv_rows}

    points = DECODE_POINTS if not args.quick else [(1, 1024), (32, 1024), (64, 2048), (256, 1024)]
    if args.points:
        points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",")]
    if graphs is not None:
        sy = probe.host_syncs_ahead()
        out["host_syncs_ahead"] = sy
        log(f"  stream syncs in {sy['steps']} decode steps ({sy['steps_ahead']} launched ahead): {sy['syncs']} "
            f"(expect 0){'; first: ' + sy['first_sync'] if sy['first_sync'] else ''}")
    for b, c in points:
        if not probe.fits(b, c, extra=40):
            need = b * (c + 40) * kvb / 2**30
            out["decode"].append({"batch": b, "ctx": c, "skipped": f"KV needs {need:.0f} GiB > capacity"})
            log(f"  decode b={b:3d} ctx={c:5d}: does not fit in KV ({need:.0f} GiB)")
            continue
        # the same point with steps launched ahead (asynchronous scheduling) and synchronous steps
        r = probe.decode_step_time(b, c, steps=args.steps, async_scheduling=True)
        rs = probe.decode_step_time(b, c, steps=args.steps, async_scheduling=False)
        nbytes = wbytes + b * r["mean_ctx"] * kvb
        roof = nbytes / bw
        r.update(tok_s=b / r["step_s"], bytes=nbytes, roofline_s=roof, ratio=roof / r["step_s"],
                 ratio_gpu=roof / r["gpu_s"] if r["gpu_s"] else None, sync_step_s=rs["step_s"],
                 sync_mean_step_s=rs["mean_step_s"], sync_tok_s=b / rs["step_s"], sync_ratio=roof / rs["step_s"],
                 sync_gpu_s=rs["gpu_s"])
        out["decode"].append(r)
        log(f"  decode b={b:3d} ctx={c:5d}: {r['tok_s']:9.1f} tok/s  step {r['step_s'] * 1e3:7.3f} ms "
            f"(mean {r['mean_step_s'] * 1e3:.3f}, min {r['min_step_s'] * 1e3:.3f}, max {r['max_step_s'] * 1e3:.3f}; "
            f"{r['steps_ahead']}/{args.steps} ahead)  sync {rs['step_s'] * 1e3:7.3f} ms  "
            f"gpu {r['gpu_s'] * 1e3:7.3f} ms  roofline {roof * 1e3:7.3f} ms  ratio {r['ratio']:.2f} "
            f"(sync {r['sync_ratio']:.2f}, gpu {r['ratio_gpu']:.2f})")
        save(f"bench_{preset}.json", out)
    for b, c in ((1, 1024), (64, 2048)):
        if probe.fits(b, c, extra=64):
            for mode in (False, True):
                br = probe.decode_breakdown(b, c, async_scheduling=mode)
                out.setdefault("breakdown", []).append({"batch": b, "ctx": c, "async": mode, **br})
                log(f"  breakdown b={b} ctx={c} {'async' if mode else 'sync'}: "
                    + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in br.items()))

    for n in (PREFILL_POINTS if args.prefill else ()):
        t = probe.prefill_time(n, repeats=3)
        fl = prefill_flops(mc, n)
        roof = fl / (ceil["matmul_tflops"] * 1e12)
        r = {"tokens": n, "time_s": t, "tok_s": n / t, "tflops": fl / t / 1e12, "roofline_s": roof, "ratio": roof / t}
        out["prefill"].append(r)
        log(f"  prefill {n:5d}: {t * 1e3:8.2f} ms {n / t:9.0f} tok/s {fl / t / 1e12:6.1f} TFLOP/s ratio {roof / t:.2f}")
        save(f"bench_{preset}.json", out)

    if args.profile_dir:
        from tandem.profile.profiler import profile_engine
        cmd = "python3 " + " ".join(sys.argv)
        prof = profile_engine(eng, plan, model=f"random-weight {preset} (tandem model init --preset {preset})",
                              preset=preset, command=cmd, weight_load_s=took[0], worker_start_s=start_s,
                              copy_gbps=ceil["copy_gbps"], mm_tflops=ceil["matmul_tflops"],
                              log=lambda s: log(s))
        pdir = Path(args.profile_dir)
        pdir.mkdir(parents=True, exist_ok=True)
        tag = "h100" if "H100" in torch.cuda.get_device_name() else "h200" if "H200" in torch.cuda.get_device_name() \
            else "gpu"
        prof.save(pdir / f"{tag}_{preset}.json")
        out["profile"] = str(pdir / f"{tag}_{preset}.json")

    if args.hf:
        out["generate"] = {}
        for b in (1, 32):
            out["generate"][f"engine_b{b}"] = engine_generate_tps(llm, b)
            log(f"  engine generate b={b:3d}: {out['generate'][f'engine_b{b}']:8.1f} tok/s (128 prompt + 128 new)")
        save(f"bench_{preset}.json", out)
        del probe, eng, llm, graphs
        gc.collect()
        torch.cuda.empty_cache()
        hf = hf_generate_tps(str(d), [1, 32])
        for b, v in hf.items():
            out["generate"][f"hf_b{b}"] = v
    save(f"bench_{preset}.json", out)
    return out


def table(results: list[dict], ceil: dict) -> str:
    L = [f"device: {ceil['device']}; date {ceil['date']}; copy bandwidth {ceil['copy_gbps']:.0f} GB/s (read+write); "
         f"bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s", ""]
    L.append("Decode: `step ms` / `ratio` with asynchronous scheduling (steps launched ahead, the default on "
             "CUDA); `sync` the same point with synchronous steps; `GPU-only` the step's graph replay alone.")
    L.append("")
    L.append("| preset | phase | batch | context / prompt | tok/s | step ms | sync step ms | GPU-only ms | roofline ms "
             "| ratio | sync ratio | GPU-only ratio |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for d in r["decode"]:
            if "skipped" in d:
                L.append(f"| {r['preset']} | decode | {d['batch']} | {d['ctx']} | n/a | | | | | | | {d['skipped']} |")
                continue
            sync_ms = f"{d['sync_step_s'] * 1e3:.3f}" if d.get("sync_step_s") else ""
            sync_ratio = f"{d['sync_ratio']:.2f}" if d.get("sync_ratio") else ""
            L.append(f"| {r['preset']} | decode | {d['batch']} | {d['ctx']} | {d['tok_s']:.0f} | {d['step_s'] * 1e3:.3f} | "
                     f"{sync_ms} | {d['gpu_s'] * 1e3:.3f} | {d['roofline_s'] * 1e3:.3f} | {d['ratio']:.2f} | "
                     f"{sync_ratio} | {d['ratio_gpu']:.2f} |")
        for p in r["prefill"]:
            L.append(f"| {r['preset']} | prefill | 1 | {p['tokens']} | {p['tok_s']:.0f} | {p['time_s'] * 1e3:.2f} | "
                     f"| | {p['roofline_s'] * 1e3:.2f} | {p['ratio']:.2f} ({p['tflops']:.0f} TFLOP/s) | | |")
    L.append("")
    L.append("| preset | generate (128+128) | engine tok/s | HF tok/s | speed-up |")
    L.append("|---|---:|---:|---:|---:|")
    for r in results:
        g = r.get("generate") or {}
        for b in (1, 32):
            e, h = g.get(f"engine_b{b}"), g.get(f"hf_b{b}")
            if e:
                L.append(f"| {r['preset']} | batch {b} | {e:.0f} | {h:.1f} | {e / h:.1f}x |" if h else
                         f"| {r['preset']} | batch {b} | {e:.0f} | | |")
    L.append("")
    L.append("Goals (engine-level ratios; GPU-only in parentheses):")
    by = {r["preset"]: r for r in results}

    def dec(preset, b, c):
        for d in by.get(preset, {}).get("decode", []):
            if d.get("batch") == b and d.get("ctx") == c and "ratio" in d:
                return d
        return None
    for preset, b, c, goal in (("llama-3.1-8b", 1, 1024, 0.8), ("llama-3.1-8b", 64, 2048, 0.7),
                               ("llama-3.2-1b", 1, 1024, 0.6)):
        d = dec(preset, b, c)
        if d:
            sync = f", sync {d['sync_ratio']:.2f}" if d.get("sync_ratio") else ""
            L.append(f"- {preset} decode b={b} ctx={c}: {d['ratio']:.2f} (GPU-only {d['ratio_gpu']:.2f}{sync}) vs goal "
                     f"{goal}: " + ("MET" if d["ratio"] >= goal else "missed"))
    for p in by.get("llama-3.1-8b", {}).get("prefill", []):
        if p["tokens"] == 2048:
            L.append(f"- llama-3.1-8b prefill 2k: {p['ratio']:.2f} vs goal 0.6: " + ("MET" if p["ratio"] >= 0.6 else "missed"))
    for r in results:
        g = r.get("generate") or {}
        if g.get("engine_b1") and g.get("hf_b1"):
            x = g["engine_b1"] / g["hf_b1"]
            L.append(f"- {r['preset']} batch-1 generate vs HF: {x:.1f}x vs goal 30x: " + ("MET" if x >= 30 else "missed"))
    L.append("")
    for r in results:
        for b in r.get("breakdown", []):
            L.append(f"{r['preset']} decode b={b['batch']} ctx={b['ctx']} {'async' if b.get('async') else 'sync'} "
                     f"step breakdown (ms): " + ", ".join(
                         f"{k} {v * 1e3:.3f}" for k, v in b.items() if k not in ("batch", "ctx", "async")))
        for c in r.get("gemv", []):
            gbs = [c['n'] * c['k'] * 2 / (us * 1e3) for us in (c['unfused_us'], c['best_us'])]   # bf16 weight bytes
            L.append(f"{r['preset']} one-row GEMV {c['role']} [{c['n']} x {c['k']}]: unfused {c['unfused_us']:.1f} "
                     f"us/layer ({gbs[0]:.0f} GB/s), triton {c['best_us']:.1f} us ({gbs[1]:.0f} GB/s, {c['best']}) -> "
                     f"{'triton' if c['chosen'] else 'unfused'}")
        L.append(f"{r['preset']}: weights {r['weight_bytes'] / 1e9:.2f} GB, KV {r['kv_bytes_per_token']} B/token, "
                 f"KV capacity {r['kv_capacity_tokens']} tokens, worker start {r['worker_start_s']:.1f}s "
                 f"(weights {r['weight_load_s']:.1f}s, graph capture {r['graph_capture_s'] or 0:.1f}s)")
    return "\n".join(L)


def cmd_bench(args) -> int:
    ceil = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(),
            "copy_gbps": copy_bandwidth_gbps(), "matmul_tflops": matmul_tflops()}
    log(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.0f} TFLOP/s")
    results = []
    for preset in args.presets.split(","):
        try:
            results.append(bench_preset(preset, args, ceil, Path(args.models_dir)))
        except Exception as e:  # keep going: report what ran
            import traceback
            traceback.print_exc()
            log(f"!! {preset} failed: {e}")
        gc.collect()
        torch.cuda.empty_cache()
        txt = table(results, ceil)
        (OUT / "table.md").write_text(txt + "\n")
    # re-measure the ceilings at the end: a drifting clock would show here
    ceil["copy_gbps_end"], ceil["matmul_tflops_end"] = copy_bandwidth_gbps(), matmul_tflops()
    save("ceilings.json", ceil)
    txt = table(results, ceil)
    (OUT / "table.md").write_text(txt + "\n")
    log("\n" + txt)
    log(f"ceilings at end: copy {ceil['copy_gbps_end']:.0f} GB/s, matmul {ceil['matmul_tflops_end']:.0f} TFLOP/s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--quick", action="store_true", help="fewer tuning configs")
    k.add_argument("--no-graph", dest="graph", action="store_false",
                   help="time plain launches (includes Python launch cost) instead of CUDA-graph replays")
    k.set_defaults(func=cmd_kernels)
    t = sub.add_parser("trace", help="per-kernel breakdown of decode steps (fused kernels on/off)")
    t.add_argument("--presets", default="llama-3.1-8b,llama-3.2-1b")
    t.add_argument("--models-dir", default="/tmp/tandem_models")
    t.add_argument("--points", default="1:1024,64:2048,32:4096")
    t.set_defaults(func=cmd_trace)
    b = sub.add_parser("bench")
    b.add_argument("--presets", default="llama-3.2-1b,llama-3.1-8b")
    b.add_argument("--models-dir", default="/tmp/tandem_models")
    b.add_argument("--profile-dir", default=None)
    b.add_argument("--hf", action="store_true", help="also time HF transformers generate (batch 1 and 32)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--points", default=None, help="decode points batch:context,... (default: the full grid)")
    b.add_argument("--no-prefill", dest="prefill", action="store_false", help="skip the prefill points")
    b.set_defaults(func=cmd_bench)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
