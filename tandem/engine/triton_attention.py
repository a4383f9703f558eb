"""Triton kernels for paged attention and KV-cache writes (CUDA only; the torch reference in
`tandem.engine.attention` stays the CPU path and the ground truth).

One attention kernel serves decode, prefill and mixed (chunked-prefill + decode) batches over the
paged KV cache `kv_layer[0|1, block, offset, kv_head, head_dim]`:

* grid axis 1 is the KV head; all `Hq / Hkv` query heads of that KV head are packed into the rows of
  one tile (row m = query token m // G, head m % G), so each K/V tile is read once per group (GQA);
* grid axis 0 walks query blocks of `BLOCK_Q` tokens over the flattened varlen batch (a binary
  search over `query_start_loc` finds the sequence); each query row at absolute position p attends
  to keys 0..p (causal with the cached-context offset, so prefix hits and chunks just work);
* grid axis 2 splits the key range into `num_segments` pieces for decode batches too small to fill
  the GPU (flash-decoding); a second small kernel merges the segments' partial softmax states.

Everything the launch depends on comes from shapes and `meta.num_seqs` / `meta.max_query_len`
(never from the sequence lengths), so a decode step is capturable in a CUDA graph: the kernels read
`seq_lens` / `block_tables` / `query_start_loc` from device memory at run time.

Padded (dummy) rows are allowed: a sequence of length 0 produces zeros, and KV writes with a
negative slot are skipped.
"""
from __future__ import annotations

import os

import torch

try:  # triton is absent on CPU CI machines
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when the Triton kernels can run here (CUDA device + triton), unless disabled by
    TANDEM_DISABLE_TRITON=1 (then everything falls back to the torch reference)."""
    if not HAS_TRITON or os.environ.get("TANDEM_DISABLE_TRITON") == "1":
        return False
    return torch.cuda.is_available() or _INTERPRET


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


if HAS_TRITON:

    @triton.jit
    def _find_seq_idx(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
        # largest i with qsl[i] // BLOCK_Q + i <= target (query blocks of sequence i start there)
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            v = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            if v <= target:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _attn_tile(q, m_i, l_i, acc, t, k_ptr, v_ptr, bt_row, kv_head_off, q_pos, kv_len, qk_scale,
                   offs_n, offs_d, stride_kb, stride_ko,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   TILE_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
        """One KV tile of online softmax. MASKED=False: every key of the tile is visible to every row."""
        kpos = t * TILE_N + offs_n
        if MASKED:
            k_ok = kpos < kv_len
            blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + kpos // BLOCK_SIZE).to(tl.int64)
        kv_off = blk * stride_kb + (kpos % BLOCK_SIZE) * stride_ko + kv_head_off
        k_ptrs = k_ptr + kv_off[None, :] + offs_d[:, None]          # [D, N]
        v_ptrs = v_ptr + kv_off[:, None] + offs_d[None, :]          # [N, D]
        if MASKED:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_P:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale                              # [M, N], log2 domain
        if MASKED:
            visible = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    # num_seqs / stride_bt vary from step to step: without do_not_specialize, Triton compiles a new
    # variant the first time one of them is 1 or a multiple of 16 (a ~1 s stall in the middle of serving)
    @triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
    def _paged_attn_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr,
        block_tables_ptr, seq_lens_ptr, qsl_ptr,
        seg_acc_ptr, seg_max_ptr, seg_sum_ptr,
        qk_scale,                      # softmax scale * log2(e)
        num_seqs,
        stride_qt, stride_qh,
        stride_ot, stride_oh,
        stride_kb, stride_ko, stride_kh,
        stride_bt,
        NUM_HEADS: tl.constexpr,       # query heads
        GROUP: tl.constexpr,           # query heads per kv head
        HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,      # tokens per KV-cache block
        BLOCK_Q: tl.constexpr,         # query tokens per program
        BLOCK_M: tl.constexpr,         # rows per program (>= BLOCK_Q * GROUP, power of 2, >= 16)
        TILE_N: tl.constexpr,          # keys per inner iteration
        NUM_SEGMENTS: tl.constexpr,    # key-range splits (1: write the output directly)
        DECODE: tl.constexpr,          # every sequence has exactly one query token: program 0 = seq
        IEEE: tl.constexpr,            # fp32 inputs: exact fp32 dots (no tf32), for fp32 parity checks
    ):
        pid_q = tl.program_id(0)
        kv_head = tl.program_id(1)
        seg = tl.program_id(2)
        if DECODE:
            seq_idx = pid_q
            q_block = 0
        else:
            seq_idx = _find_seq_idx(qsl_ptr, pid_q, num_seqs, BLOCK_Q)
            q_block = pid_q - (tl.load(qsl_ptr + seq_idx) // BLOCK_Q + seq_idx)
        q_start = tl.load(qsl_ptr + seq_idx)
        q_len = tl.load(qsl_ptr + seq_idx + 1) - q_start
        if q_block * BLOCK_Q < q_len:
            seq_len = tl.load(seq_lens_ptr + seq_idx)
            ctx_len = seq_len - q_len                       # tokens before this step's first query

            offs_m = tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, HEAD_DIM_P)
            d_ok = offs_d < HEAD_DIM
            q_local = q_block * BLOCK_Q + offs_m // GROUP   # query index within the sequence
            head = kv_head * GROUP + offs_m % GROUP
            row_ok = ((offs_m // GROUP) < BLOCK_Q) & (q_local < q_len)
            tok = (q_start + q_local).to(tl.int64)
            q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            q_pos = ctx_len + q_local                       # absolute position of each row

            # keys [0, kv_len) are visible to some row of this block
            kv_len = ctx_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
            kv_len = tl.where(seq_len > 0, kv_len, 0)
            num_tiles = tl.cdiv(kv_len, TILE_N)
            if NUM_SEGMENTS > 1:
                per_seg = tl.cdiv(num_tiles, NUM_SEGMENTS)
                t_begin = seg * per_seg
                t_end = tl.minimum(t_begin + per_seg, num_tiles)
            else:
                t_begin = 0
                t_end = num_tiles

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
            offs_n = tl.arange(0, TILE_N)
            bt_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_bt
            kv_head_off = kv_head * stride_kh
            # tiles entirely visible to every row of the block need no masks (the bulk of a long
            # prompt or a decode context); only the diagonal / last tiles are masked
            n_full = (ctx_len + q_block * BLOCK_Q + 1) // TILE_N
            full_end = tl.minimum(tl.maximum(n_full, t_begin), t_end)
            for t in range(t_begin, full_end):
                m_i, l_i, acc = _attn_tile(q, m_i, l_i, acc, t, k_ptr, v_ptr, bt_row, kv_head_off, q_pos, kv_len,
                                           qk_scale, offs_n, offs_d, stride_kb, stride_ko, HEAD_DIM, HEAD_DIM_P,
                                           BLOCK_SIZE, TILE_N, False, IEEE)
            for t in range(full_end, t_end):
                m_i, l_i, acc = _attn_tile(q, m_i, l_i, acc, t, k_ptr, v_ptr, bt_row, kv_head_off, q_pos, kv_len,
                                           qk_scale, offs_n, offs_d, stride_kb, stride_ko, HEAD_DIM, HEAD_DIM_P,
                                           BLOCK_SIZE, TILE_N, True, IEEE)

            if NUM_SEGMENTS == 1:
                l_use = tl.where(l_i == 0.0, 1.0, l_i)
                o = acc / l_use[:, None]
                tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            else:
                row = (tok * NUM_HEADS + head) * NUM_SEGMENTS + seg     # [M]
                tl.store(seg_max_ptr + row, m_i, mask=row_ok)
                tl.store(seg_sum_ptr + row, l_i, mask=row_ok)
                tl.store(seg_acc_ptr + row[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _merge_segments_kernel(
        out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr,
        stride_ot, stride_oh,
        NUM_HEADS: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, NUM_SEGMENTS)
        offs_d = tl.arange(0, HEAD_DIM_P)
        base = (t * NUM_HEADS + h) * NUM_SEGMENTS
        m = tl.load(seg_max_ptr + base + offs_s)
        m_all = tl.max(m, 0)
        m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.math.exp2(m - m_use)
        denom = tl.sum(tl.load(seg_sum_ptr + base + offs_s) * w, 0)
        denom = tl.where(denom == 0.0, 1.0, denom)
        acc = tl.load(seg_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM_P + offs_d[None, :])
        o = tl.sum(acc * w[:, None], 0) / denom
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cs, stride_ch,            # cache: slot stride (= kv_heads * head_dim), head stride
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        HP: tl.constexpr, DP: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offs_h = tl.arange(0, HP)
            offs_d = tl.arange(0, DP)
            msk = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=msk)
            v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=msk)
            dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=msk)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=msk)


# --------------------------------------------------------------------------- launch configuration
# (BLOCK_M, TILE_N, num_warps, num_stages); tuned on H100 (see docs/benchmarks.md).
DECODE_CFG = {"tile_n": 64, "num_warps": 4, "num_stages": 3}
PREFILL_CFG = {"block_m": 64, "tile_n": 64, "num_warps": 4, "num_stages": 2}
SMALL_Q_CFG = {"block_m": 64, "tile_n": 64, "num_warps": 4, "num_stages": 2}


def num_decode_segments(num_seqs: int, num_kv_heads: int, device: torch.device, max_segments: int = 16) -> int:
    """How many key-range splits a decode batch gets: enough programs for ~4 per SM. Depends only on
    the batch size, so a CUDA graph captured at a batch size stays valid for any context length."""
    programs = max(1, num_seqs * num_kv_heads)
    target = 4 * _num_sms(device)
    if programs >= target:
        return 1
    return max(1, min(max_segments, _next_pow2(-(-target // programs))))


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta, scale: float,
                    out: torch.Tensor | None = None, num_segments: int | None = None,
                    cfg: dict | None = None) -> torch.Tensor:
    """q [T, Hq, D] (any row/head strides, unit last stride) -> out [T, Hq, D], over
    kv_layer [2, blocks, block_size, Hkv, D]. Same contract as `attention.paged_attention_ref`.
    num_segments / cfg override the launch heuristics (for tuning sweeps)."""
    T, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    assert q.stride(-1) == 1 and num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(T, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    kc, vc = kv_layer[0], kv_layer[1]
    num_seqs = meta.num_seqs
    dp = _next_pow2(head_dim)
    decode = meta.max_query_len == 1 and T == num_seqs
    bt = meta.block_tables
    if decode:
        cfg = cfg or DECODE_CFG
        block_q = 1
        block_m = max(16, _next_pow2(group))
        grid0 = num_seqs
        nseg = num_segments or num_decode_segments(num_seqs, num_kv_heads, q.device)
    else:
        cfg = cfg or (PREFILL_CFG if meta.max_query_len * group >= 128 else SMALL_Q_CFG)
        block_m = max(cfg["block_m"], _next_pow2(group))
        block_q = block_m // group
        grid0 = T // block_q + num_seqs
        nseg = 1
    if nseg > 1:
        seg_acc = torch.empty(T * num_heads * nseg, dp, dtype=torch.float32, device=q.device)
        seg_max = torch.empty(T * num_heads * nseg, dtype=torch.float32, device=q.device)
        seg_sum = torch.empty_like(seg_max)
    else:
        seg_acc = seg_max = seg_sum = out            # unused
    _paged_attn_kernel[(grid0, num_kv_heads, nseg)](
        out, q, kc, vc, bt, meta.seq_lens, meta.query_start_loc,
        seg_acc, seg_max, seg_sum,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), bt.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=dp, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=cfg["tile_n"], NUM_SEGMENTS=nseg, DECODE=decode,
        IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if nseg > 1:
        _merge_segments_kernel[(T, num_heads)](
            out, seg_acc, seg_max, seg_sum, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SEGMENTS=nseg, HEAD_DIM=head_dim, HEAD_DIM_P=dp, num_warps=1)
    return out


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter k, v [T, Hkv, D] into their slots of kv_layer; slots < 0 are skipped (padding)."""
    T, hkv, d = k.shape
    if T == 0:
        return
    kc, vc = kv_layer[0], kv_layer[1]
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kc.is_contiguous()
    _write_kv_kernel[(T,)](
        k, v, kc, vc, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(1), kc.stride(2),
        NUM_KV_HEADS=hkv, HEAD_DIM=d, HP=_next_pow2(hkv), DP=_next_pow2(d), num_warps=2)
