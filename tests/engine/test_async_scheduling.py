"""Asynchronous scheduling (a decode step launched before the previous step's tokens reach the host)
gives exactly the outputs of synchronous stepping, frees every KV block, and really runs ahead.

On CPU nothing overlaps, but the ordering is the same as on the GPU: the step in flight is read after
the next one is launched, its ids are fed to the next step as a tensor, stopped requests' extra
tokens are dropped."""
import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine, resolve_async_scheduling


def prompts(k, lens=(5, 23, 40, 17, 64, 3)):
    g = torch.Generator().manual_seed(k)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in lens]


def both(model_dir, ps, params, **kw):
    """Generate with async scheduling off and on; returns (sync outputs, async outputs, async engine)."""
    outs = []
    for on in (False, True):
        llm = LLM(model_dir, device="cpu", async_scheduling=on, **kw)
        outs.append(llm.generate(ps, params))
    return outs[0], outs[1], llm.engine


def same(a, b):
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.text for o in a] == [o.text for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]


def test_greedy_batch_of_lengths_and_max_tokens(llama_dir):
    ps = prompts(0)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 2, 7, 13, 20, 4)]
    a, b, eng = both(llama_dir, ps, params)
    same(a, b)
    assert [len(o.token_ids) for o in b] == [1, 2, 7, 13, 20, 4]
    assert eng.num_steps_ahead >= 15                    # most decode steps ran ahead
    assert eng.kv.pool.num_used == 0 and not eng.has_unfinished_requests()


def test_stop_ids_strings_eos_and_min_tokens(llama_dir):
    """Requests that stop on a token the host has not seen yet: the extra step's token is dropped."""
    ps = prompts(1, lens=(12, 30, 8, 21))
    free = LLM(llama_dir, device="cpu").generate(ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    eos = LLM(llama_dir, device="cpu").tokenizer.eos_token_ids[0]
    params = [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[free[0].token_ids[6]]),
        SamplingParams(temperature=0, max_tokens=24, stop=[free[1].text[10:13]] if free[1].text[10:13].strip()
                       else None, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, min_tokens=9, stop_token_ids=[free[2].token_ids[3], eos]),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    ]
    a, b, eng = both(llama_dir, ps, params)
    same(a, b)
    assert b[0].finish_reason == "stop" and len(b[0].token_ids) <= 7
    assert len(b[2].token_ids) >= 9
    assert eng.kv.pool.num_used == 0


def test_seeded_sampling_identical(llama_dir):
    """Each seeded request draws once per emitted token; a dropped extra step belongs to a finished
    request, whose generator is never used again."""
    ps = prompts(2, lens=(9, 25, 14, 33, 6))
    params = [SamplingParams(temperature=t, top_p=tp, top_k=tk, seed=100 + i, max_tokens=m,
                             stop_token_ids=[7, 11, 13, 17, 19, 23])
              for i, (t, tp, tk, m) in enumerate([(1.0, 0.9, 50, 16), (0.7, 1.0, 0, 20), (1.3, 0.8, 20, 12),
                                                  (1.0, 1.0, 5, 18), (0.5, 0.95, 0, 9)])]
    params.append(SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))      # a greedy row in the mix
    a, b, eng = both(llama_dir, ps + [ps[0]], params)
    same(a, b)
    assert eng.num_steps_ahead > 0


def test_logprobs_identical_and_run_ahead(llama_dir):
    """Logprobs are packed on the device and copied with the ids, so those steps run ahead too."""
    ps = prompts(3, lens=(10, 20, 7))
    params = [SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=9, logprobs=0, ignore_eos=True)]
    a, b, eng = both(llama_dir, ps, params)
    same(a, b)
    assert [lp["token_id"] for lp in b[0].logprobs] == b[0].token_ids
    assert all(len(lp["top"]) == 2 for lp in b[0].logprobs) and all(lp["top"] == [] for lp in b[2].logprobs)
    assert a[0].logprobs == b[0].logprobs and a[2].logprobs == b[2].logprobs
    assert eng.num_steps_ahead >= 5


def test_saturated_batch_with_a_queue_runs_ahead(llama_dir):
    """max_num_seqs full and requests queued behind it: steps still run ahead, same outputs; a queued
    interactive request (ordered before the batch-class ones) is admitted as in synchronous steps."""
    ps = prompts(8, lens=(11, 6, 19, 8, 14, 9))
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 12, 7, 5, 10)]
    params[3] = SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[ps[3][0]])
    outs = []
    for on in (False, True):
        eng = Engine(EngineConfig(llama_dir, device="cpu", async_scheduling=on, max_num_seqs=2, aging_s=0))
        got = {}
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(f"r{i}", p, sp, "batch")
        for k in range(200):
            if k == 6:
                eng.add_request("vip", ps[0][:5], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            for d in eng.step():
                got[d.request_id] = got.get(d.request_id, []) + d.new_token_ids
            if not eng.has_unfinished_requests():
                break
        outs.append(got)
        assert eng.kv.pool.num_used == 0
    assert outs[0] == outs[1]
    assert eng.num_steps_ahead >= 10


def test_preemption_under_small_kv_pool(llama_dir):
    ps = prompts(4, lens=(30, 30, 30, 30))
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    a, b, eng = both(llama_dir, ps, params, num_kv_blocks=10, enable_prefix_caching=False)
    same(a, b)
    assert eng.stats().num_preemptions > 0
    assert eng.kv.pool.num_free == 10


def test_abort_with_a_step_in_flight_frees_kv(llama_dir):
    eng = Engine(EngineConfig(llama_dir, device="cpu", async_scheduling=True))
    ref = Engine(EngineConfig(llama_dir, device="cpu", async_scheduling=False))
    ps = prompts(5, lens=(20, 11, 37))
    got = {e: {} for e in (eng, ref)}
    for e in (eng, ref):
        for i, p in enumerate(ps):
            e.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        for _ in range(4):
            for d in e.step():
                got[e].setdefault(d.request_id, []).extend(d.new_token_ids)
    assert eng._inflight is not None                    # a step is in flight when the abort comes
    out = eng.abort_request("r1")
    ref.abort_request("r1")
    assert out.finished and out.finish_reason == "abort"
    for e in (eng, ref):
        while e.has_unfinished_requests():
            for d in e.step():
                assert d.request_id != "r1"             # the aborted request's token in flight is dropped
                got[e].setdefault(d.request_id, []).extend(d.new_token_ids)
        assert e.kv.pool.num_used == 0
    assert got[eng]["r0"] == got[ref]["r0"] and got[eng]["r2"] == got[ref]["r2"]
    assert got[ref]["r1"][:len(got[eng]["r1"])] == got[eng]["r1"]
    # aborting everything while a step is in flight leaves no work behind
    eng.add_request("x", ps[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.abort_request("x")
    assert not eng.has_unfinished_requests() and eng.kv.pool.num_used == 0


def test_detach_reads_the_step_in_flight(llama_dir):
    """Detach mid-flight: the token in flight is part of the last delta, then the request continues
    on another engine exactly as if it had never moved."""
    p = prompts(6, lens=(29,))[0]
    sp = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    ref = LLM(llama_dir, device="cpu", async_scheduling=False).generate([p, p[:9]], sp)[0]
    a = Engine(EngineConfig(llama_dir, device="cpu", async_scheduling=True))
    b = Engine(EngineConfig(llama_dir, device="cpu", async_scheduling=True))
    a.add_request("m", p, sp)
    a.add_request("other", p[:9], sp)
    toks, text = [], ""
    for _ in range(6):
        for d in a.step():
            if d.request_id == "m":
                toks += d.new_token_ids
                text += d.new_text
    assert a._inflight is not None
    last = a.detach_request("m")
    toks += last.new_token_ids
    text += last.new_text
    assert len(toks) == 6 and toks == ref.token_ids[:6]
    kv = a.export_kv("m")
    a.release_kv("m")
    for _ in range(3):                                  # the other request keeps going; "m" is gone
        assert all(d.request_id != "m" for d in a.step())
    b.add_request("m", p, sp, output_token_ids=toks, kv_import=kv)
    while b.has_unfinished_requests():
        for d in b.step():
            toks += d.new_token_ids
            text += d.new_text
    assert toks == ref.token_ids and text == ref.text


def test_auto_setting(monkeypatch):
    monkeypatch.delenv("TANDEM_ASYNC_SCHEDULING", raising=False)
    assert resolve_async_scheduling(None, torch.device("cuda")) is True
    assert resolve_async_scheduling(None, torch.device("cpu")) is False
    assert resolve_async_scheduling(False, torch.device("cuda")) is False
    monkeypatch.setenv("TANDEM_ASYNC_SCHEDULING", "1")
    assert resolve_async_scheduling(None, torch.device("cpu")) is True
    monkeypatch.setenv("TANDEM_ASYNC_SCHEDULING", "0")
    assert resolve_async_scheduling(None, torch.device("cuda")) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_graph_path_identical_and_sync_free(llama_dir):
    """On CUDA (graph replay with the ids fed on the device): same tokens as synchronous steps, seeded
    rows too, and no stream sync while a step is launched ahead."""
    from tandem.profile.measure import EngineProbe
    ps = prompts(7, lens=(9, 25, 14, 33))
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True, logprobs=i or None)
              for i in range(3)] + \
        [SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=16, stop_token_ids=[7, 11, 13])]
    outs = []
    for on in (False, True):
        # fp32: a stopped request's extra row can change the graph bucket; keep near-ties out of it
        llm = LLM(llama_dir, device="cuda", dtype="float32", async_scheduling=on, max_num_seqs=16)
        assert llm.engine.runner.graphs is not None
        outs.append(llm.generate(ps, params))
    same(*outs)
    for i in (1, 2):   # same token ids; values to fp32 noise: a batch-1 step takes the Triton GEMV, and a
        a, b = outs[0][i].logprobs, outs[1][i].logprobs       # stopped row launched ahead can make it batch 2
        assert [x["token_id"] for x in a] == [x["token_id"] for x in b]
        assert [[t for t, _ in x["top"]] for x in a] == [[t for t, _ in x["top"]] for x in b]
        assert [x["logprob"] for x in a] == pytest.approx([x["logprob"] for x in b], abs=1e-4)
    assert llm.engine.num_steps_ahead > 0
    res = EngineProbe(llm.engine).host_syncs_ahead(batch=3, ctx=40, steps=6)
    assert res["steps_ahead"] == 6 and res["syncs"] == 0, res


def test_sync_probe_ignores_debug_mode_notice():
    """torch's 'prototype feature' notice under sync debug mode is not a sync (it failed the GPU test)."""
    from tandem.profile.measure import _is_sync_warning
    assert not _is_sync_warning("Synchronization debug mode is a prototype feature and does not yet detect "
                                "all synchronizing operations")
    assert _is_sync_warning("called a synchronizing CUDA operation")
