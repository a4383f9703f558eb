"""Triton GEMV for one-row (batch-1 decode) projections, with the neighbouring small op fused in.

At batch 1 a decode layer is nine short kernels; each projection is a GEMV that reads its weight
once, and the small ops around it (RMSNorm with the residual add before qkv and gate_up, SiLU-mul
before down, the fp32 cast after lm_head) are separate launches that cost ~2 us each. Here the
GEMV computes its input on the fly:

* MODE_PLAIN    y = x W^T                         (o_proj; lm_head with `out_f32`)
* MODE_SILU     y = silu_and_mul(x) W^T           (down_proj reads gate_up's output)
* MODE_RMS      y = rms_norm(x) W^T               (layer 0's qkv: no residual yet)
* MODE_ADD_RMS  r = x + res; y = rms_norm(r) W^T  (qkv, gate_up; program 0 also writes r)

with the same intermediate roundings to the activation dtype as the reference ops in
`tandem.engine.model` (only the dot product's summation order differs from cuBLAS).

Whether it is used is decided per projection at start-up (`tune`): every candidate block shape
and the unfused path (the norm/act kernel + cuBLAS) are timed over all layers' weights (so the
weights come from HBM, as in a step, not from L2) and the fastest wins, so it is never slower than
the unfused path on that device. TANDEM_GEMV=0 switches it off. CUDA only; CPU keeps the reference.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.engine.triton_attention import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

log = logging.getLogger(__name__)

MODE_PLAIN, MODE_SILU, MODE_RMS, MODE_ADD_RMS = 0, 1, 2, 3


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 3


# candidates timed at start-up (few: each one is a Triton compile per projection). On the H100 the
# narrow, long tiles won every projection of the 1B and 8B (wider ones, 8..32 rows x 256..512, lost)
CANDIDATES = (GemvConfig(2, 1024, 4), GemvConfig(1, 1024, 4), GemvConfig(1, 2048, 4), GemvConfig(2, 2048, 8),
              GemvConfig(4, 1024, 8), GemvConfig(4, 512, 4), GemvConfig(2, 1024, 4, 4))


def enabled() -> bool:
    return HAS_TRITON and os.environ.get("TANDEM_GEMV", "1") != "0" \
        and os.environ.get("TANDEM_DISABLE_TRITON") != "1" and os.environ.get("TANDEM_DISABLE_FUSED") != "1"


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, r_out_ptr, N, K, stride_w, eps,
                     MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_F32: tl.constexpr, EVEN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs = tl.arange(0, BLOCK_K)
        dt = w_ptr.dtype.element_ty
        rstd = 0.0
        if MODE >= 2:                                   # RMS statistics over the whole row (from L2)
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs
                km = kk < K
                x = tl.load(x_ptr + kk, mask=km, other=0.0)
                if MODE == 3:
                    r = tl.load(r_ptr + kk, mask=km, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
                    tl.store(r_out_ptr + kk, x, mask=km & (pid == 0))
                xf = x.to(tl.float32)
                ss += xf * xf
            rstd = tl.math.rsqrt(tl.sum(ss, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs
            km = kk < K
            if MODE == 1:
                g = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + kk, mask=km, other=0.0).to(tl.float32)
                s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
                a = (s * u).to(dt).to(tl.float32)
            elif MODE >= 2:
                x = tl.load(x_ptr + kk, mask=km, other=0.0)
                if MODE == 3:
                    r = tl.load(r_ptr + kk, mask=km, other=0.0)
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
                nw = tl.load(nw_ptr + kk, mask=km, other=0.0).to(tl.float32)
                a = ((x.to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
            else:
                a = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
            wp = w_ptr + rows[:, None].to(tl.int64) * stride_w + kk[None, :]
            if EVEN:
                w = tl.load(wp)
            else:
                w = tl.load(wp, mask=(rows[:, None] < N) & km[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        y = y.to(dt)
        if OUT_F32:
            tl.store(out_ptr + rows, y.to(tl.float32), mask=rows < N)
        else:
            tl.store(out_ptr + rows, y, mask=rows < N)


def gemv(x: torch.Tensor, weight: torch.Tensor, cfg: GemvConfig, mode: int = MODE_PLAIN,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         bias: torch.Tensor | None = None, out_f32: bool = False, out: torch.Tensor | None = None):
    """One-row projection. x [1, K] ([1, 2K] for MODE_SILU). Returns y [1, N] (fp32 if out_f32),
    and for MODE_RMS / MODE_ADD_RMS also the new residual (x, or x + residual)."""
    N, K = weight.shape
    assert x.shape[0] == 1 and x.is_contiguous() and weight.stride(1) == 1
    assert x.shape[1] == (2 * K if mode == MODE_SILU else K), (x.shape, weight.shape, mode)
    if out is None:
        out = torch.empty(1, N, dtype=torch.float32 if out_f32 else weight.dtype, device=x.device)
    r_out = None
    if mode == MODE_ADD_RMS:
        assert residual is not None and residual.is_contiguous()
        r_out = torch.empty_like(x)
    even = N % cfg.block_n == 0 and K % cfg.block_k == 0
    _gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else x, out, r_out if r_out is not None else out, N, K, weight.stride(0), eps,
        MODE=mode, HAS_BIAS=bias is not None, OUT_F32=out_f32, EVEN=even, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if mode == MODE_RMS:
        return out, x
    if mode == MODE_ADD_RMS:
        return out, r_out
    return out


# --------------------------------------------------------------------------- start-up choice
@dataclass
class GemvChoice:
    """What `tune` measured for one projection (all layers' weights, one row)."""
    role: str
    n: int
    k: int
    mode: int
    unfused_us: float
    best: GemvConfig | None
    best_us: float
    chosen: bool
    tried: list = None          # [(GemvConfig, us per layer)] of every candidate


def _roles(model):
    """(role, mode, [(linear, norm or None)], out_f32) of the projections that can take the GEMV."""
    layers = model.model.layers
    return [   # qkv is timed with the residual add of layers 1..; layer 0 (no residual yet) runs MODE_RMS
        ("qkv", MODE_ADD_RMS, [(l.self_attn.qkv_proj, l.input_layernorm) for l in layers], False),
        ("o", MODE_PLAIN, [(l.self_attn.o_proj, None) for l in layers], False),
        ("gate_up", MODE_ADD_RMS, [(l.mlp.gate_up_proj, l.post_attention_layernorm) for l in layers], False),
        ("down", MODE_SILU, [(l.mlp.down_proj, None) for l in layers], False),
        ("lm_head", MODE_PLAIN, [(model.lm_head, None)], True),
    ]


def unfused(x, lin, norm, mode, residual=None, out_f32=False):
    """The reference path the GEMV replaces: the fused norm / act kernel, then cuBLAS."""
    from tandem.engine import kernels
    r = None
    if mode == MODE_SILU:
        x = kernels.silu_and_mul(x)
    elif mode == MODE_RMS:
        r, x = x, kernels.rms_norm(x, norm.weight, norm.eps)
    elif mode == MODE_ADD_RMS:
        x, r = kernels.add_rms_norm(x, residual, norm.weight, norm.eps)
    y = F.linear(x, lin.weight, lin.bias)
    if out_f32:
        y = y.float()
    return y if r is None else (y, r)


def fused(x, lin, norm, mode, cfg, residual=None, out_f32=False, out=None):
    return gemv(x, lin.weight, cfg, mode, residual=residual, norm_weight=None if norm is None else norm.weight,
                eps=0.0 if norm is None else norm.eps, bias=lin.bias, out_f32=out_f32, out=out)


def _time_us(fn, n_layers: int) -> float:
    """One pass over all layers, captured in a CUDA graph as in a decode step (no Python launch
    cost), median replay time per layer in us."""
    from tandem.profile.measure import time_cuda
    return time_cuda(fn, iters=7, warmup=2, graph=True) * 1e6 / n_layers


@torch.inference_mode()
def tune(model, candidates=CANDIDATES) -> list[GemvChoice]:
    """Time the unfused path and each candidate per projection; set `linear.gemv` on the winners."""
    choices = []
    dev, dt = model.device, model.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    for role, mode, pairs, out_f32 in _roles(model):
        lin0 = pairs[0][0]
        N, K = lin0.weight.shape
        for lin, _ in pairs:
            lin.gemv = None
        if lin0.weight.stride(1) != 1:
            continue
        x = torch.randn(1, 2 * K if mode == MODE_SILU else K, device=dev, dtype=dt, generator=gen)
        res = torch.randn(1, K, device=dev, dtype=dt, generator=gen) if mode == MODE_ADD_RMS else None

        def run_unfused():
            for lin, norm in pairs:
                unfused(x, lin, norm, mode, res, out_f32)
        base = _time_us(run_unfused, len(pairs))
        best, best_us, tried = None, float("inf"), []
        kmax = triton.next_power_of_2(K)
        for cfg in dict.fromkeys(GemvConfig(c.block_n, min(c.block_k, kmax), c.num_warps, c.num_stages)
                                 for c in candidates):
            def run_fused(cfg=cfg):
                for lin, norm in pairs:
                    fused(x, lin, norm, mode, cfg, res, out_f32)
            us = _time_us(run_fused, len(pairs))
            tried.append((cfg, round(us, 2)))
            if us < best_us:
                best, best_us = cfg, us
        chosen = best is not None and best_us < base
        for lin, _ in pairs:
            lin.gemv = best if chosen else None
        choices.append(GemvChoice(role, N, K, mode, base, best, best_us, chosen, tried))
        log.info("gemv %s [%d x %d]: unfused %.1f us, triton %s %.1f us -> %s", role, N, K, base, best, best_us,
                 "triton" if chosen else "unfused")
    return choices


def assign(model, cfg: GemvConfig | None) -> None:
    """Give every eligible projection the same block shape (tests; `tune` picks per projection)."""
    for _, _, pairs, _ in _roles(model):
        for lin, _ in pairs:
            lin.gemv = cfg
