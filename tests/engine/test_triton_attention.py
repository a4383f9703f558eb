"""Triton paged attention / KV write / fused kernels against the torch reference.

Runs on CUDA (bf16, the real check) and, where TRITON_INTERPRET=1 is set with triton installed, on
the CPU through Triton's interpreter (slow, small shapes). Skips otherwise (CPU CI has no triton).
Outputs are poisoned with NaN before every call, so an unwritten element fails the check.
"""
import os

import pytest
import torch

from tandem.engine import triton_attention as ta
from tandem.engine.attention import AttnMetadata, paged_attention_ref, write_kv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (ta.HAS_TRITON and (torch.cuda.is_available() or INTERPRET)),
                                reason="needs triton and CUDA (or TRITON_INTERPRET=1)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 2e-2 if DT == torch.bfloat16 else 1e-4


def make_batch(specs, hq, hkv, d, block_size=16, num_blocks=None, seed=0, dtype=DT, device=DEV):
    """specs: [(q_len, seq_len)] -> (q, kv_layer, meta). Blocks are a random permutation, so
    sequences' blocks are scattered over the cache."""
    g = torch.Generator().manual_seed(seed)
    nblk = [(s + block_size - 1) // block_size for _, s in specs]
    total = num_blocks or sum(nblk) + 3
    perm = torch.randperm(total, generator=g).tolist()
    tables, i = [], 0
    for n in nblk:
        tables.append(perm[i:i + n])
        i += n
    T = sum(q for q, _ in specs)
    gd = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(T, hq, d, generator=gd, device=device).to(dtype)
    kv = torch.randn(2, total, block_size, hkv, d, generator=gd, device=device, dtype=torch.float32
                     if dtype == torch.float32 else torch.bfloat16).to(dtype)
    qsl = [0]
    for ql, _ in specs:
        qsl.append(qsl[-1] + ql)
    seq_lens = [s for _, s in specs]
    slots = []
    for (ql, s), t in zip(specs, tables):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(s - ql, s)]
    width = max(1, max(len(t) for t in tables))
    meta = AttnMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        max_query_len=max(ql for ql, _ in specs), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, block_tables_cpu=tables)
    return q, kv, meta


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_attention(specs, hq, hkv, d, block_size=16, seed=0, num_segments=None, q_strided=False):
    q, kv, meta = make_batch(specs, hq, hkv, d, block_size, seed=seed)
    if q_strided:   # q as a view into a wider qkv-like buffer, as the model passes it
        buf = torch.randn(q.shape[0], hq * d + 2 * hkv * d, device=q.device).to(q.dtype)
        buf[:, :hq * d] = q.reshape(q.shape[0], -1)
        q = buf[:, :hq * d].view(q.shape[0], hq, d)
    scale = d ** -0.5
    ref = paged_attention_ref(q.float().contiguous(), kv.float(), meta, scale)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    ta.paged_attention(q, kv, meta, scale, out=out, num_segments=num_segments)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = rel_err(out, ref)
    assert err < TOL, err
    return err


SHAPES = [(32, 8, 64), (32, 8, 128), (8, 8, 64), (28, 4, 128)]   # llama-1b, llama-8b, MHA, group of 7


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_decode(hq, hkv, d):
    specs = [(1, n) for n in (1, 15, 16, 17, 100, 257, 1000)]
    check_attention(specs, hq, hkv, d)
    for nseg in (1, 2, 16):
        check_attention(specs, hq, hkv, d, num_segments=nseg, seed=nseg)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_prefill_varlen(hq, hkv, d):
    check_attention([(37, 37), (1, 1), (130, 130), (64, 64)], hq, hkv, d)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_mixed_prefix_hits_and_chunks(hq, hkv, d):
    # chunk on top of cached context, decode rows, fresh prompt, prefix-hit remainder
    check_attention([(50, 300), (1, 77), (33, 33), (1, 1), (17, 160), (1, 1024)], hq, hkv, d, q_strided=True)


def test_block_sizes():
    for bs in (1, 8, 32):
        check_attention([(5, 40), (1, 70), (20, 20)], 32, 8, 64, block_size=bs)


def test_padding_rows_are_zero():
    q, kv, meta = make_batch([(1, 10), (1, 1)], 32, 8, 64)
    meta.seq_lens[1] = 0                             # a CUDA-graph padding row
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    ta.paged_attention(q, kv, meta, 0.125, out=out)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_write_kv_matches_reference_and_skips_negative_slots():
    q, kv, meta = make_batch([(5, 40), (3, 3)], 32, 8, 64, seed=3)
    T = q.shape[0]
    k = torch.randn(T, 8, 64, device=q.device).to(kv.dtype)
    v = torch.randn(T, 8, 64, device=q.device).to(kv.dtype)
    ref = kv.clone()
    write_kv(ref, k, v, meta.slot_mapping)
    got = kv.clone()
    ta.write_kv(got, k, v, meta.slot_mapping)
    assert torch.equal(got, ref)
    slots = meta.slot_mapping.clone()
    slots[1] = -1
    got2 = kv.clone()
    ta.write_kv(got2, k, v, slots)
    flat = got2.view(2, -1, 8, 64)
    s1 = int(meta.slot_mapping[1])
    assert torch.equal(flat[:, s1], kv.view(2, -1, 8, 64)[:, s1])


def test_fused_kernels():
    from tandem.engine import kernels, model
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 256, generator=g).to(DEV, DT)
    r = torch.randn(37, 256, generator=g).to(DEV, DT)
    w = torch.randn(256, generator=g).to(DEV, DT)
    out = kernels.rms_norm(x, w, 1e-5)
    assert rel_err(out, model.rms_norm(x, w, 1e-5)) < 1e-2
    o2, r2 = kernels.add_rms_norm(x, r, w, 1e-5)
    e_o, e_r = model.add_rms_norm(x, r, w, 1e-5)
    assert rel_err(o2, e_o) < 1e-2 and rel_err(r2, e_r) < 1e-2
    gu = torch.randn(37, 2 * 300, generator=g).to(DEV, DT)
    assert rel_err(kernels.silu_and_mul(gu), model.silu_and_mul(gu)) < 1e-2
    # rotary + KV write, q rotated in place inside a qkv buffer
    hq, hkv, d = 32, 8, 64
    qb, kv, meta = make_batch([(5, 40), (3, 3)], hq, hkv, d, seed=9)
    T = qb.shape[0]
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=g).to(DEV, DT)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    pos = torch.tensor([35, 36, 37, 38, 39, 0, 1, 2], device=DEV)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = model.rotary_cos_sin(pos, inv.to(DEV))
    ref_q = model.apply_rotary(q, cos, sin)
    ref_kv = kv.clone()
    write_kv(ref_kv, model.apply_rotary(k, cos, sin), v, meta.slot_mapping)
    got_kv = kv.clone()
    q_out = kernels.rope_and_cache(q, k, v, cos, sin, got_kv, meta.slot_mapping)
    assert rel_err(q_out, ref_q) < 1e-2
    assert rel_err(got_kv, ref_kv) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_cuda_kernels_and_graphs_match_torch_path(tiny_model_dir, monkeypatch):
    """fp32 on the GPU: Triton attention + fused kernels + decode CUDA graphs give the same greedy
    tokens as the plain torch path (no Triton, no graphs), over batching, chunked prefill, a prefix
    hit and batch sizes that fall between graph buckets."""
    from tandem import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 200, (40,), generator=g).tolist()
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 23, 70, 17, 3)]
    prompts.append(shared + [5, 6, 7])
    prompts.append(shared + [9])
    for name in ("llama", "qwen3"):
        d = tiny_model_dir(name)
        kw = dict(device="cuda", dtype="float32", max_num_batched_tokens=32, num_kv_blocks=128, max_num_seqs=8)
        fast = LLM(d, **kw)
        assert fast.engine.runner.graphs is not None
        got = [o.token_ids for o in fast.generate(prompts, params)]
        monkeypatch.setenv("TANDEM_DISABLE_TRITON", "1")
        slow = LLM(d, cuda_graphs=False, **kw)
        want = [o.token_ids for o in slow.generate(prompts, params)]
        monkeypatch.delenv("TANDEM_DISABLE_TRITON")
        assert got == want, name
