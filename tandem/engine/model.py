"""One decoder-only model class for Llama 3.x, Mistral, Qwen2/2.5 and Qwen3 (nano-vllm style).

Differences between the families are flags on `ModelConfig`:
  attention_bias (q/k/v bias: qwen2), o_proj_bias, qk_norm (per-head RMSNorm on q, k: qwen3),
  rope_scaling (llama3 / linear), tie_word_embeddings.
q/k/v and gate/up projections are fused (`qkv_proj`, `gate_up_proj`); the loader maps the HF
names into row slices of them. Parameter names otherwise mirror HF (`model.layers.0.self_attn...`).

The batch is flattened (T tokens of several sequences, no padding); attention goes through the
paged KV cache (`tandem.engine.attention`). The small functions `rms_norm`, `add_rms_norm`,
`silu_and_mul`, `rotary_cos_sin`, `apply_rotary` are the seams where fused GPU kernels plug in;
`norm_linear`, `MLP.down` and `compute_logits` are where a one-row input on CUDA takes the Triton
GEMV with that small op fused in (`tandem.engine.gemv`, chosen per projection at start-up).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine import gemv as gemv_ops
from tandem.engine import kernels as fused
from tandem.engine.attention import AttnMetadata, paged_attention, write_kv
from tandem.engine.model_config import ModelConfig


# --------------------------------------------------------------------------- swappable ops
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual += x; return (rms_norm(residual), residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32, CPU), with Llama-3 / linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin [T, head_dim/2] fp32, computed from the positions (no long precomputed table)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE on x [T, H, D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# --------------------------------------------------------------------------- layers
def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). Weights are allocated uninitialised: the loader fills them. `gemv`: the Triton
    GEMV block shape chosen at start-up for one-row inputs on CUDA (`tandem.engine.gemv.tune`), or None."""

    gemv = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.shape[0] == 1:
            return gemv_ops.gemv(x.contiguous(), self.weight, self.gemv, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


def norm_linear(norm: "RMSNorm", lin: Linear, h: torch.Tensor, residual: torch.Tensor | None):
    """lin(norm(h + residual)) and the new residual; one GEMV kernel for one row when tuned so."""
    if lin.gemv is not None and h.shape[0] == 1:
        if residual is None:
            return gemv_ops.gemv(h.contiguous(), lin.weight, lin.gemv, gemv_ops.MODE_RMS, norm_weight=norm.weight,
                                 eps=norm.eps, bias=lin.bias)
        return gemv_ops.gemv(h.contiguous(), lin.weight, lin.gemv, gemv_ops.MODE_ADD_RMS,
                             residual=residual.contiguous(), norm_weight=norm.weight, eps=norm.eps, bias=lin.bias)
    if residual is None:
        residual, h = h, norm(h)
    else:
        h, residual = norm(h, residual)
    return lin(h), residual


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if fused.use_fused(x):                                      # CUDA: one Triton kernel
            if residual is None:
                return fused.rms_norm(x, self.weight, self.eps)
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, dtype, device)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_proj_bias, dtype, device)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)

    def forward(self, qkv, cos, sin, kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """qkv: the output of `qkv_proj` (the layer runs it, fused with the input norm)."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused.use_fused(qkv):                                    # CUDA: rotary + KV write in one kernel
            q = fused.rope_and_cache(q, k, v, cos, sin, kv_layer, meta.slot_mapping)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            write_kv(kv_layer, k, v, meta.slot_mapping)
        o = paged_attention(q, kv_layer, meta, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, dtype, device)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, dtype, device)

    def forward(self, x):
        return self.down(self.gate_up_proj(x))

    def down(self, h):
        """down_proj(silu_and_mul(h)); one GEMV kernel for one row when tuned so."""
        if self.down_proj.gemv is not None and h.shape[0] == 1:
            return gemv_ops.gemv(h.contiguous(), self.down_proj.weight, self.down_proj.gemv, gemv_ops.MODE_SILU,
                                 bias=self.down_proj.bias)
        return self.down_proj(fused.silu_and_mul(h) if fused.use_fused(h) else silu_and_mul(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(self, h, residual, cos, sin, kv_layer, meta):
        qkv, residual = norm_linear(self.input_layernorm, self.self_attn.qkv_proj, h, residual)
        h = self.self_attn(qkv, cos, sin, kv_layer, meta)
        gate_up, residual = norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, h, residual)
        return self.mlp.down(gate_up), residual


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, dtype, device):
        super().__init__()
        self.weight = _param(num, dim, dtype=dtype, device=device)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class CausalLM(nn.Module):
    """`forward` -> final-normed hidden states [T, hidden]; `compute_logits` on the rows you sample."""

    # HF checkpoint name -> (fused param name, shard index); shard order is (q, k, v) and (gate, up)
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, dtype, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq_cpu = rope_inv_freq(cfg)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        if self.device.type != "meta":
            self.inv_freq(self.device)            # ready before any CUDA-graph capture

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        t = self._inv_freq.get(device)
        if t is None:
            t = self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return t

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions: [T] (flattened batch); kv_cache[layer, 2, blocks, block_size, kv_heads, head_dim]."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(positions, self.inv_freq(h.device))
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, cos, sin, kv_cache[i], meta)
        h, _ = self.model.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> float32 logits [n, vocab_size]."""
        if self.lm_head.gemv is not None and hidden.shape[0] == 1:     # the fp32 cast in the GEMV
            return gemv_ops.gemv(hidden.contiguous(), self.lm_head.weight, self.lm_head.gemv, out_f32=True)
        return F.linear(hidden, self.lm_head.weight).float()
