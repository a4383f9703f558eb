"""Triton one-row GEMV (with fused RMSNorm / residual add / SiLU-mul / fp32 cast) against the torch
reference ops of tandem.engine.model, every candidate block shape, outputs poisoned with NaN first.

Runs on CUDA (bf16, the real check) and under TRITON_INTERPRET=1 with triton installed (CPU, fp32,
small shapes); skips otherwise (CPU CI has no triton: the CPU engine never takes this path).
"""
import os

import pytest
import torch

from tandem.engine import gemv as G
from tandem.engine.model import CausalLM, add_rms_norm, norm_linear, rms_norm, silu_and_mul
from tandem.engine.model_config import ModelConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (G.HAS_TRITON and (torch.cuda.is_available() or INTERPRET)),
                                reason="needs triton and CUDA (or TRITON_INTERPRET=1)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
# (N, K): a shape that fits no block evenly, and (on CUDA) the llama-3.2-1b qkv / down shapes
SHAPES = [(40, 96)] + ([(2048, 8192)] if DEV == "cuda" else [(64, 512)])
CFGS = G.CANDIDATES if DEV == "cuda" else G.CANDIDATES[:2]


def _ref(mode, x, w, res, nw, eps, out_f32):
    """Reference: the torch ops, bf16 activations, then a fp32 dot product rounded to the dtype."""
    r = None
    if mode == G.MODE_SILU:
        x = silu_and_mul(x)
    elif mode == G.MODE_RMS:
        r, x = x, rms_norm(x, nw, eps)
    elif mode == G.MODE_ADD_RMS:
        x, r = add_rms_norm(x, res, nw, eps)
    y = (x.float() @ w.float().T).to(w.dtype)
    return (y.float() if out_f32 else y), r


@pytest.mark.parametrize("mode", [G.MODE_PLAIN, G.MODE_SILU, G.MODE_RMS, G.MODE_ADD_RMS])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_reference(mode, shape):
    N, K = shape
    g = torch.Generator(device=DEV).manual_seed(N * 7 + K + mode)
    w = (torch.randn(N, K, device=DEV, generator=g) / K ** 0.5).to(DT)
    x = torch.randn(1, 2 * K if mode == G.MODE_SILU else K, device=DEV, generator=g).to(DT)
    res = torch.randn(1, K, device=DEV, generator=g).to(DT)
    nw = (1 + 0.1 * torch.randn(K, device=DEV, generator=g)).to(DT)
    out_f32 = mode == G.MODE_PLAIN
    ref, ref_r = _ref(mode, x, w, res, nw, 1e-5, out_f32)
    tol = 2e-2 if DT == torch.bfloat16 else 1e-4
    for cfg in CFGS:
        out = torch.full((1, N), float("nan"), device=DEV, dtype=torch.float32 if out_f32 else DT)
        got = G.gemv(x, w, cfg, mode, residual=res, norm_weight=nw, eps=1e-5, out_f32=out_f32, out=out)
        y, r = got if isinstance(got, tuple) else (got, None)
        assert y is out and not torch.isnan(y).any(), cfg
        assert y.dtype == ref.dtype
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol, msg=lambda m: f"{cfg}: {m}")
        if ref_r is not None:
            assert torch.equal(r, ref_r), cfg          # the new residual is exact


def test_model_forward_same_with_gemv():
    """A tiny llama: one-row forward + logits with every projection on the GEMV equals the reference."""
    cfg = ModelConfig(arch="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
    torch.manual_seed(0)
    m = CausalLM(cfg, dtype=DT, device=DEV)
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    h = torch.randn(3, 1, 64, device=DEV, dtype=DT)
    outs = []
    for on in (False, True):
        G.assign(m, G.CANDIDATES[0] if on else None)
        res = None
        x = h[0]
        ys = []
        for layer in m.model.layers:          # the layer's projections without attention (no KV here)
            qkv, res = norm_linear(layer.input_layernorm, layer.self_attn.qkv_proj, x, res)
            o = layer.self_attn.o_proj(qkv[:, :64].contiguous())
            gu, res = norm_linear(layer.post_attention_layernorm, layer.mlp.gate_up_proj, o, res)
            x = layer.mlp.down(gu)
            ys += [qkv, o, gu, x, res]
        ys.append(m.compute_logits(x))
        outs.append(ys)
    G.assign(m, None)
    tol = 3e-2 if DT == torch.bfloat16 else 1e-4
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)
