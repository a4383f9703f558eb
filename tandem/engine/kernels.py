"""Fused element-wise Triton kernels for the model's swappable ops (CUDA only).

Each kernel computes exactly what the torch op of the same name in `tandem.engine.model` computes,
with the same intermediate roundings to the activation dtype, in one pass over memory:

* `rms_norm(x, w, eps)` and `add_rms_norm(x, residual, w, eps)` (residual add + norm, one kernel);
* `silu_and_mul(x)`: silu(gate) * up of a fused gate_up projection;
* `rope_and_cache(q, k, v, cos, sin, kv_layer, slot_mapping)`: rotate q (in place) and k
  (neox rotate-half), and scatter the rotated k and v into the paged KV cache: replaces
  `apply_rotary` x2 + `write_kv` (about 20 small torch kernels per layer) with one launch.

`use_fused(x)` says whether to take these paths (CUDA tensor, triton importable, not disabled by
TANDEM_DISABLE_TRITON=1); the CPU path never touches this module's kernels.
"""
from __future__ import annotations

import os

import torch

from tandem.engine.triton_attention import HAS_TRITON, _next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_fused(x: torch.Tensor) -> bool:
    if not HAS_TRITON or os.environ.get("TANDEM_DISABLE_TRITON") == "1" \
            or os.environ.get("TANDEM_DISABLE_FUSED") == "1":
        return False
    return x.is_cuda or _INTERPRET


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                         N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        msk = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=msk, other=0.0)
        dt = x.dtype
        if HAS_RES:
            r = tl.load(res_ptr + row * stride_r + offs, mask=msk, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)
            tl.store(res_out_ptr + row * stride_ro + offs, x, mask=msk)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        w = tl.load(w_ptr + offs, mask=msk, other=0.0)
        y = (xf * rstd).to(dt).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < N
        g = tl.load(x_ptr + row * stride_x + offs, mask=msk, other=0.0)
        u = tl.load(x_ptr + row * stride_x + N + offs, mask=msk, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (s * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs_t,
                           stride_cs, stride_ch,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                           HQP: tl.constexpr, HKP: tl.constexpr, HALF_P: tl.constexpr, WRITE_CACHE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, HALF_P)
        d_ok = offs_d < HALF
        c = tl.load(cos_ptr + t * stride_cs_t + offs_d, mask=d_ok, other=0.0)[None, :]
        s = tl.load(sin_ptr + t * stride_cs_t + offs_d, mask=d_ok, other=0.0)[None, :]
        # q: rotate in place
        offs_h = tl.arange(0, HQP)
        m = (offs_h[:, None] < NUM_HEADS) & d_ok[None, :]
        p = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
        x1 = tl.load(p, mask=m, other=0.0)
        x2 = tl.load(p + HALF, mask=m, other=0.0)
        dt = x1.dtype
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(p, (a * c - b * s).to(dt), mask=m)
        tl.store(p + HALF, (b * c + a * s).to(dt), mask=m)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offs_k = tl.arange(0, HKP)
            mk = (offs_k[:, None] < NUM_KV_HEADS) & d_ok[None, :]
            pk = k_ptr + t * stride_kt + offs_k[:, None] * stride_kh + offs_d[None, :]
            y1 = tl.load(pk, mask=mk, other=0.0).to(tl.float32)
            y2 = tl.load(pk + HALF, mask=mk, other=0.0).to(tl.float32)
            pv = v_ptr + t * stride_vt + offs_k[:, None] * stride_vh + offs_d[None, :]
            v1 = tl.load(pv, mask=mk, other=0.0)
            v2 = tl.load(pv + HALF, mask=mk, other=0.0)
            dst = slot * stride_cs + offs_k[:, None] * stride_ch + offs_d[None, :]
            cdt = kc_ptr.dtype.element_ty
            tl.store(kc_ptr + dst, (y1 * c - y2 * s).to(dt).to(cdt), mask=mk)
            tl.store(kc_ptr + dst + HALF, (y2 * c + y1 * s).to(dt).to(cdt), mask=mk)
            tl.store(vc_ptr + dst, v1.to(cdt), mask=mk)
            tl.store(vc_ptr + dst + HALF, v2.to(cdt), mask=mk)


def _row_warps(n: int) -> int:
    return 1 if n <= 256 else 2 if n <= 1024 else 4 if n <= 4096 else 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    n = x2.shape[-1]
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, n, eps,
                                         HAS_RES=False, BLOCK=_next_pow2(n), num_warps=_row_warps(n))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual) in one pass."""
    x2, r2 = _rows(x), _rows(residual)
    n = x2.shape[-1]
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
                                         res_out.stride(0), n, eps, HAS_RES=True, BLOCK=_next_pow2(n),
                                         num_warps=_row_warps(n))
    return out.view(x.shape), res_out.view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    n = x2.shape[-1] // 2
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(2048, _next_pow2(n))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n,
                                                                 BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], n)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kv_layer: torch.Tensor | None, slot_mapping: torch.Tensor | None) -> torch.Tensor:
    """Rotate q [T, Hq, D] in place (returned) and k [T, Hkv, D]; write rotated k and v into
    kv_layer [2, blocks, block_size, Hkv, D] at slot_mapping (slots < 0 skipped). cos/sin: [T, D/2] fp32."""
    T, hq, d = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and d % 2 == 0
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    assert cos.stride(0) == sin.stride(0)
    if T == 0:
        return q
    kc, vc = kv_layer[0], kv_layer[1]
    assert kc.is_contiguous()
    _rope_cache_kernel[(T,)](q, k, v, cos, sin, kc, vc, slot_mapping,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             cos.stride(0), kc.stride(1), kc.stride(2),
                             NUM_HEADS=hq, NUM_KV_HEADS=hkv, HALF=d // 2, HQP=_next_pow2(hq), HKP=_next_pow2(hkv),
                             HALF_P=_next_pow2(d // 2), WRITE_CACHE=True, num_warps=4 if hq * d > 2048 else 2)
    return q
