"""End-to-end engine correctness against Hugging Face transformers on the same random weights:
greedy tokens for batching, chunked prefill, prefix-cache hits, preemption and KV export/import."""
import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.common.errors import ContextTooLong, InvalidParams, ModelDirError
from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine
from tandem.worker.protocol import Delta, Deltas, decode, encode

N_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def arch_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.fixture(scope="module")
def hf_model(arch_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(arch_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, ids, n=N_NEW):
    """Reference greedy continuation by full recompute (no cache, no EOS handling)."""
    x = torch.tensor([ids])
    out = []
    for _ in range(n):
        tok = int(model(x).logits[0, -1].argmax())
        out.append(tok)
        x = torch.cat([x, torch.tensor([[tok]])], dim=1)
    return out


def prompts(k, lens=(5, 23, 40, 17, 64, 3)):
    g = torch.Generator().manual_seed(k)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in lens]


def test_batch_of_different_lengths(arch_dir, hf_model):
    ps = prompts(0)
    outs = LLM(arch_dir, device="cpu").generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf_model, p)
        assert o.finish_reason == "length"


def test_chunked_prefill(arch_dir, hf_model):
    ps = prompts(1, lens=(70, 45))
    llm = LLM(arch_dir, device="cpu", max_num_batched_tokens=16)    # prompts take 3-5 chunks
    outs = llm.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf_model, p)
    assert llm.engine.stats().steps >= 70 // 16 + N_NEW


def test_prefix_cache_hit(arch_dir, hf_model):
    llm = LLM(arch_dir, device="cpu")
    base = prompts(2, lens=(48,))[0]
    first = llm.generate([base], GREEDY)[0]
    assert first.num_cached_tokens == 0
    ext = base + [7, 8, 9, 10, 11]
    o = llm.generate([ext], GREEDY)[0]
    assert o.num_cached_tokens == 48                       # three full 16-token blocks reused
    assert o.token_ids == hf_greedy(hf_model, ext)


def test_preempted_and_resumed(arch_dir, hf_model):
    ps = prompts(3, lens=(30, 30, 30, 30))
    # 10 blocks of 16 tokens: four 42-token sequences cannot all fit, so some are preempted
    llm = LLM(arch_dir, device="cpu", num_kv_blocks=10, enable_prefix_caching=False)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True))
    assert llm.engine.stats().num_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf_model, p)
    assert llm.engine.kv.pool.num_free == 10


def test_kv_export_import(arch_dir, hf_model):
    p = prompts(4, lens=(37,))[0]
    a = Engine(EngineConfig(arch_dir, device="cpu"))
    b = Engine(EngineConfig(arch_dir, device="cpu"))
    a.add_request("r", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
    first = []
    while a.has_unfinished_requests():
        for d in a.step():
            first += d.new_token_ids
    kv = a.export_kv("r")
    a.release_kv("r")
    assert a.kv.pool.num_used == 0 and kv.num_tokens == 37
    b.add_request("r", p, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True),
                  output_token_ids=first, kv_import=kv)
    toks = list(first)
    computed = 0
    while b.has_unfinished_requests():
        for d in b.step():
            toks += d.new_token_ids
            computed = d.num_cached_tokens
    assert computed == 37                               # the prompt was not recomputed
    assert b.stats().prompt_tokens_computed == 0
    assert toks == hf_greedy(hf_model, p)


def test_stop_strings_min_tokens_seed_logprobs(llama_dir):
    llm = LLM(llama_dir, device="cpu")
    p = prompts(5, lens=(10,))[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop = free.text[5:8]
    if stop.strip():
        o = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
        assert o.finish_reason == "stop" and stop not in o.text and free.text.startswith(o.text)
    s1 = llm.generate([p], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=10))[0]
    s2 = llm.generate([p, p[:4]], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=10))[0]
    assert s1.token_ids == s2.token_ids
    eos = llm.tokenizer.eos_token_ids[0]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, min_tokens=8, stop_token_ids=[eos]))[0]
    assert len(o.token_ids) == 8
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))[0]
    assert len(o.logprobs) == 3 and all(len(lp["top"]) == 2 and lp["logprob"] <= 0 for lp in o.logprobs)
    assert [lp["token_id"] for lp in o.logprobs] == o.token_ids


def test_abort_frees_blocks(llama_dir):
    eng = Engine(EngineConfig(llama_dir, device="cpu"))
    eng.add_request("x", list(range(3, 60)), SamplingParams(max_tokens=50))
    eng.step()
    assert eng.kv.pool.num_used > 0
    out = eng.abort_request("x")
    assert out.finished and out.finish_reason == "abort"
    assert eng.kv.pool.num_used == 0 and not eng.has_unfinished_requests()


def test_bad_input(llama_dir, tmp_path):
    eng = Engine(EngineConfig(llama_dir, device="cpu", max_model_len=64))
    with pytest.raises(ContextTooLong, match="maximum context length"):
        eng.add_request("a", list(range(3, 80)), SamplingParams())
    with pytest.raises(InvalidParams, match="at least one token"):
        eng.add_request("b", [], SamplingParams())
    with pytest.raises(InvalidParams, match="priority"):
        eng.add_request("c", [5], SamplingParams(), priority="urgent")
    for bad, name in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
                      (dict(max_tokens=0), "max_tokens")]:
        with pytest.raises(InvalidParams, match=name):
            SamplingParams(**bad)
    with pytest.raises(ModelDirError):
        Engine(EngineConfig(str(tmp_path / "nope"), device="cpu"))


def test_detach_and_continue_elsewhere(llama_dir, tmp_path):
    """Migration (decode→prefill flip): detach mid-generation, move the KV, finish on another engine."""
    p = prompts(6, lens=(29,))[0]
    ref = LLM(llama_dir, device="cpu").generate([p], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0]
    a = Engine(EngineConfig(llama_dir, device="cpu"))
    b = Engine(EngineConfig(llama_dir, device="cpu"))
    a.add_request("m", p, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))
    toks, text = [], ""
    for _ in range(6):
        for d in a.step():
            toks += d.new_token_ids
            text += d.new_text
    last = a.detach_request("m")
    toks += last.new_token_ids
    text += last.new_text
    assert not a.has_unfinished_requests() and len(toks) == 6
    kv = a.export_kv("m")
    a.release_kv("m")
    assert a.kv.pool.num_used == 0
    b.add_request("m", p, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True), output_token_ids=toks,
                  kv_import=kv)
    while b.has_unfinished_requests():
        for d in b.step():
            toks += d.new_token_ids
            text += d.new_text
    assert toks == ref.token_ids and text == ref.text
    assert b.stats().prompt_tokens_computed == 0


def test_first_output_reports_the_queue_wait(llama_dir):
    """The output with a request's first token says how long it waited for its first step (the
    planner's prefill queue wait); later outputs do not. A request admitted behind a full batch
    (max_num_seqs 1) waits for the one ahead of it to finish."""
    eng = Engine(EngineConfig(llama_dir, device="cpu", max_num_seqs=1))
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.add_request("a", list(range(3, 40)), p)
    eng.add_request("b", list(range(5, 30)), p)
    first, later = {}, []
    while eng.has_unfinished_requests():
        for o in eng.step():
            # what the worker sends the frontend (whose planner window takes it with the first token)
            o = decode(encode(Deltas("w0", [Delta.from_output(o)]))).outputs[0]
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = o.queue_s
            elif o.new_token_ids:
                later.append(o.queue_s)
    assert set(first) == {"a", "b"}
    assert first["a"] is not None and first["a"] >= 0
    assert first["b"] is not None and first["b"] > first["a"]
    assert later and all(q is None for q in later)
