"""Paged attention: the metadata contract between the engine and the model, and the torch reference.

KV cache layout (one tensor for all layers, so a request's blocks export/import in one index op):
    kv_cache[layer, 0|1 (k|v), block, offset_in_block, kv_head, head_dim]

A step's batch is flattened: T query tokens from B sequences, sequence i owning query rows
query_start_loc[i]:query_start_loc[i+1]. Those rows are the *last* tokens of its context of
seq_lens[i] tokens (cached + new), so row j of a sequence with q new tokens sits at position
seq_lens[i] - q + j and attends to keys 0..that position (causal with an offset). Decode is q=1;
chunked prefill and prefix-cache hits are just q < seq_lens[i].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnMetadata:
    query_start_loc: torch.Tensor   # [B+1] int32, on the model's device
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32 (padded with 0)
    slot_mapping: torch.Tensor      # [T] int64: block * block_size + offset for each new token
    max_query_len: int
    max_seq_len: int
    # host copies for the reference path and for kernels' grid sizes
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_tables_cpu: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D]) into their slots of one layer's cache."""
    _, nb, bs, h, d = kv_layer.shape
    flat = kv_layer.view(2, nb * bs, h, d)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def decode_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Pure-decode batch (one query per sequence) in one padded gather: q [B, Hq, D] -> [B, Hq, D]."""
    bs, hkv, d = kv_layer.shape[2], kv_layer.shape[3], kv_layer.shape[4]
    nblk = (meta.max_seq_len + bs - 1) // bs
    tables = meta.block_tables[:, :nblk].long()                       # [B, nblk] (padding points at block 0)
    k = kv_layer[0][tables].reshape(q.shape[0], nblk * bs, hkv, d).transpose(1, 2).to(q.dtype)
    v = kv_layer[1][tables].reshape(q.shape[0], nblk * bs, hkv, d).transpose(1, 2).to(q.dtype)
    mask = torch.arange(nblk * bs, device=q.device)[None, :] < meta.seq_lens[:, None]   # [B, L]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=True)
    return o.squeeze(2)


def paged_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Reference attention over the paged cache, one sequence at a time: q [T, Hq, D] -> [T, Hq, D]."""
    if meta.is_pure_decode and meta.num_seqs > 1:
        return decode_attention_ref(q, kv_layer, meta, scale)
    bs, hkv = kv_layer.shape[2], kv_layer.shape[3]
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        s, e = qsl[i], qsl[i + 1]
        nq = e - s
        nblk = (seq_len + bs - 1) // bs
        blocks = torch.tensor(meta.block_tables_cpu[i][:nblk], device=kv_layer.device, dtype=torch.long)
        k = kv_layer[0, blocks].reshape(-1, hkv, kv_layer.shape[-1])[:seq_len]
        v = kv_layer[1, blocks].reshape(-1, hkv, kv_layer.shape[-1])[:seq_len]
        qi = q[s:e].transpose(0, 1)                                  # [Hq, nq, D]
        k = k.transpose(0, 1).to(q.dtype)
        v = v.transpose(0, 1).to(q.dtype)
        if nq == 1:
            mask = None                                              # decode: sees everything
        else:
            qpos = torch.arange(seq_len - nq, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(qi.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Dispatch: Triton kernels on CUDA when available (tandem.engine.triton_attention), else reference."""
    if q.is_cuda:
        try:
            from tandem.engine import triton_attention
        except ImportError:
            triton_attention = None
        if triton_attention is not None and triton_attention.available():
            return triton_attention.paged_attention(q, kv_layer, meta, scale)
    return paged_attention_ref(q, kv_layer, meta, scale)
