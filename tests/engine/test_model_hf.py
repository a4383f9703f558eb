"""Tandem's model code against Hugging Face transformers on the same random weights (fp32, CPU):
logits of full prefill, a flattened batch, chunked prefill, and greedy decode through the paged cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tandem.common.errors import ModelDirError
from tandem.engine.loader import load_model
from tests.engine.util import BlockAllocator, make_kv_cache, step

BS = 8            # small block size: prompts span several, partially filled, non-contiguous blocks
NUM_BLOCKS = 96
ARCHS = ["llama", "qwen2", "qwen3", "llama_rope", "llama_tied"]


def hf_load(d):
    import transformers
    from transformers import AutoModelForCausalLM
    kw = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(d, **kw).eval()


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tiny_model_dir):
    d = tiny_model_dir(request.param)
    ours, cfg = load_model(d, torch.float32, "cpu")
    return request.param, hf_load(d), ours, cfg


def rand_prompt(n, seed, vocab=3800):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def hf_logits(hf, ids):
    return hf(torch.tensor([ids])).logits[0].float()


def assert_close(ours, ref, what=""):
    tol = 1e-4 * ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff < tol, f"{what}: max |diff| {diff:.3g} >= {tol:.3g}"


def blocks_for(alloc, n):
    return alloc.take((n + BS - 1) // BS)


def test_config_flags(models):
    name, hf, ours, cfg = models
    assert cfg.arch == {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(name, "llama")
    assert cfg.attention_bias == (name == "qwen2")
    assert cfg.qk_norm == (name == "qwen3")
    assert (cfg.rope_scaling is not None) == (name == "llama_rope")
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    n_hf = sum(p.numel() for p in hf.parameters())
    assert cfg.num_params() == n_hf == sum(p.numel() for p in ours.parameters())


def test_full_prefill(models):
    name, hf, ours, cfg = models
    ids = rand_prompt(45, 1)
    kv = make_kv_cache(cfg, NUM_BLOCKS, BS)
    h = step(ours, kv, [ids], [len(ids)], [blocks_for(BlockAllocator(NUM_BLOCKS), len(ids))], BS)
    logits = ours.compute_logits(h)
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), cfg.vocab_size)
    assert_close(logits, hf_logits(hf, ids), name)


def test_flattened_batch(models):
    name, hf, ours, cfg = models
    prompts = [rand_prompt(n, 10 + n) for n in (5, 19, 33)]
    alloc = BlockAllocator(NUM_BLOCKS, seed=3)
    kv = make_kv_cache(cfg, NUM_BLOCKS, BS)
    tables = [blocks_for(alloc, len(p)) for p in prompts]
    logits = ours.compute_logits(step(ours, kv, prompts, [len(p) for p in prompts], tables, BS))
    off = 0
    for i, p in enumerate(prompts):
        assert_close(logits[off:off + len(p)], hf_logits(hf, p), f"{name} seq {i}")
        off += len(p)


def test_chunked_prefill(models):
    """First chunk, then the rest (seq_lens covering both, batched with another prompt) == full prefill."""
    name, hf, ours, cfg = models
    a, b = rand_prompt(40, 5), rand_prompt(11, 6)
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)
    alloc = BlockAllocator(NUM_BLOCKS, seed=4)
    kv = make_kv_cache(cfg, NUM_BLOCKS, BS)
    ta, tb = blocks_for(alloc, len(a)), blocks_for(alloc, len(b))
    c1 = ours.compute_logits(step(ours, kv, [a[:17]], [17], [ta], BS))
    assert_close(c1, ref_a[:17], f"{name} chunk 1")
    c2 = ours.compute_logits(step(ours, kv, [a[17:], b], [40, len(b)], [ta, tb], BS))
    assert_close(c2[:23], ref_a[17:], f"{name} chunk 2")
    assert_close(c2[23:], ref_b, f"{name} batched prompt")


def test_greedy_decode_matches_generate(models):
    """Prefill 3 prompts, then 10 steps of batched one-token decode through the paged cache."""
    name, hf, ours, cfg = models
    n_new = 10
    prompts = [rand_prompt(n, 20 + n) for n in (12, 3, 21)]
    alloc = BlockAllocator(NUM_BLOCKS, seed=5)
    kv = make_kv_cache(cfg, NUM_BLOCKS, BS)
    tables = [blocks_for(alloc, len(p) + n_new) for p in prompts]
    lens = [len(p) for p in prompts]
    h = step(ours, kv, prompts, lens, tables, BS)
    last = torch.tensor(lens).cumsum(0) - 1
    toks = ours.compute_logits(h[last]).argmax(-1).tolist()
    outs = [[t] for t in toks]
    for _ in range(n_new - 1):
        lens = [n + 1 for n in lens]
        h = step(ours, kv, [[t] for t in toks], lens, tables, BS)
        toks = ours.compute_logits(h).argmax(-1).tolist()
        for o, t in zip(outs, toks):
            o.append(t)
    eos = set(cfg.eos_token_ids)
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            x = torch.tensor([p])
            ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new,
                              pad_token_id=0)[0, len(p):].tolist()
            assert o[:len(ref)] == ref, name
            assert len(ref) == n_new or ref[-1] in eos


def test_bf16_close_to_fp32(llama_dir):
    ids = rand_prompt(30, 7)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m, cfg = load_model(llama_dir, dt, "cpu")
        assert m.model.layers[0].self_attn.qkv_proj.weight.dtype == dt
        kv = make_kv_cache(cfg, 16, BS, dtype=dt)
        out[dt] = m.compute_logits(step(m, kv, [ids], [30], [list(range(4))], BS))
    ref = out[torch.float32]
    assert torch.isfinite(out[torch.bfloat16]).all()
    assert (out[torch.bfloat16] - ref).abs().max() < 0.05 * ref.abs().max()


def test_auto_dtype_reads_config(llama_dir):
    m, _ = load_model(llama_dir, "auto", "cpu")
    assert m.dtype == torch.float32


# ---------------------------------------------------------------------------- loader errors / sharding
def _copy_dir(src, dst):
    dst.mkdir()
    for f in Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_tensor_is_named(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy_dir(llama_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelDirError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(d, torch.float32, "cpu")


def test_wrong_shape_and_unexpected_tensor(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy_dir(llama_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="shape"):
        load_model(d, torch.float32, "cpu")
    cfg["intermediate_size"] -= 1
    (d / "config.json").write_text(json.dumps(cfg))
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelDirError, match="extra"):
        load_model(d, torch.float32, "cpu")


def test_sharded_checkpoint_loads_the_same(tmp_path, monkeypatch):
    from tandem.model import init as init_mod
    monkeypatch.setattr(init_mod, "SHARD_BYTES", 1_000_000)
    a = init_mod.init_model(tmp_path / "sharded", "tiny-qwen3", seed=9, device="cpu")
    monkeypatch.setattr(init_mod, "SHARD_BYTES", 10**12)
    b = init_mod.init_model(tmp_path / "single", "tiny-qwen3", seed=9, device="cpu")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (a / "model.safetensors").exists()
    ma, _ = load_model(a, torch.float32, "cpu")
    mb, _ = load_model(b, torch.float32, "cpu")
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
