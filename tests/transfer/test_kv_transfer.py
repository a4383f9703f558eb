"""KV transfer between two real engines over ZeroMQ (CPU path): token-identical continuation,
dedup of blocks the receiver already holds, and fallback on failure."""
import threading

from tandem import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine
from tandem.transfer.kv import KVServer, fetch_kv

P = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def drain(eng):
    toks = []
    last = None
    while eng.has_unfinished_requests():
        for d in eng.step():
            toks += d.new_token_ids
            last = d
    return toks, last


def test_transfer_roundtrip_and_dedup(llama_dir):
    pre = Engine(EngineConfig(llama_dir, device="cpu"))
    dec = Engine(EngineConfig(llama_dir, device="cpu"))
    lock = threading.Lock()
    srv = KVServer(pre.export_kv, pre.release_kv, lock)
    try:
        prompt = list(range(5, 5 + 45))
        ref, _ = drain_ref(llama_dir, prompt)
        # prefill on `pre`, decode on `dec`
        pre.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
        first, _ = drain(pre)
        got = fetch_kv(srv.addr, "a", start_block=dec.prefix_hit_tokens(prompt) // 16)
        assert got is not None
        kv, ack = got
        assert kv.data.shape[2] == 3                              # 45 tokens -> 3 blocks, none held yet
        dec.add_request("a", prompt, P, output_token_ids=first, kv_import=kv)
        ack()
        toks, last = drain(dec)
        assert first + toks == ref
        assert last.num_cached_tokens == 45 and dec.stats().prompt_tokens_computed == 0
        assert pre.kv.pool.num_used == 0                          # released after the ack
        # second request sharing 32 tokens: only the 3rd block moves
        p2 = prompt[:32] + [99] * 20
        pre.add_request("b", p2, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
        first2, _ = drain(pre)
        start = dec.prefix_hit_tokens(p2) // 16
        assert start == 2
        kv2, ack2 = fetch_kv(srv.addr, "b", start_block=start)
        assert kv2.data.shape[2] == 2 and kv2.start_block == 2
        dec.add_request("b", p2, P, output_token_ids=first2, kv_import=kv2)
        ack2()
        toks2, _ = drain(dec)
        assert first2 + toks2 == drain_ref(llama_dir, p2)[0]
        assert srv.stats.requests == 2 and srv.stats.bytes > 0
    finally:
        srv.close()


def test_fetch_failure_returns_none(llama_dir):
    pre = Engine(EngineConfig(llama_dir, device="cpu"))
    srv = KVServer(pre.export_kv, pre.release_kv, threading.Lock())
    try:
        assert fetch_kv(srv.addr, "unknown-request", timeout_s=2) is None     # server replies with an error
    finally:
        srv.close()
    assert fetch_kv("tcp://127.0.0.1:1", "x", timeout_s=0.5) is None          # nobody listening: timeout


_REF = {}


def drain_ref(model_dir, prompt):
    key = tuple(prompt)
    if key not in _REF:
        eng = Engine(EngineConfig(model_dir, device="cpu"))
        eng.add_request("r", prompt, P)
        _REF[key] = drain(eng)
    return _REF[key]


def test_worker_falls_back_to_recompute_on_injected_failure(llama_dir):
    """A decode worker whose KV fetch fails still completes the request, token-identical, by prefilling
    it itself (the transfer agent's failure injection)."""
    import time as _t

    from tandem.transfer.agent import TransferAgent
    from tandem.worker.proc import WorkerCore
    from tandem.worker.protocol import Deltas, Generate
    pre = Engine(EngineConfig(llama_dir, device="cpu"))
    dec = Engine(EngineConfig(llama_dir, device="cpu"))
    src = TransferAgent(pre, threading.Lock())
    agent = TransferAgent(dec, threading.Lock())
    sent = []
    core = WorkerCore(dec, "d0", "decode", send=sent.append, transfer=agent)
    try:
        prompt = list(range(20, 20 + 40))
        pre.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
        first, _ = drain(pre)
        agent.fail_next = 1
        core.handle(Generate("a", prompt, P.to_dict(), "interactive", output_token_ids=first,
                             kv_source={"addr": src.addr, "request_id": "a"}))
        deadline = _t.monotonic() + 10
        while not dec.has_unfinished_requests() and _t.monotonic() < deadline:
            core.poll_transfers()
            _t.sleep(0.01)
        while core.has_work():
            core.step()
        toks = [t for m in sent if isinstance(m, Deltas) for d in m.outputs for t in d.new_token_ids]
        assert first + toks == drain_ref(llama_dir, prompt)[0]
        assert agent.counters.fallbacks == 1 and agent.counters.fetched == 0
        assert dec.stats().prompt_tokens_computed >= 40          # it really recomputed the prompt
    finally:
        src.close()
        agent.close()


def test_direct_locate_matches_export(llama_dir):
    """The zero-staging CUDA path serves block ids instead of a copy: on CPU, check they name exactly the
    blocks `export_kv` copies (same header, same bytes), from a start block on; on CPU the server keeps
    the staged path even when a fetcher asks for the direct one."""
    import torch

    from tandem.transfer.agent import TransferAgent
    pre = Engine(EngineConfig(llama_dir, device="cpu"))
    agent = TransferAgent(pre, threading.Lock(), direct=True)
    try:
        assert agent.server.direct is None                       # the KV cache is not on a GPU
        prompt = list(range(7, 7 + 50))
        pre.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), hold_kv=True)
        drain(pre)
        for start in (0, 1, 3):
            head, blocks, final = agent._locate("a", start)
            assert final                                         # held: KV final, served without the lock
            ref = pre.export_kv("a", start)
            assert (head["num_tokens"], head["start_block"], head["block_size"]) == \
                (ref.num_tokens, ref.start_block, ref.block_size)
            assert head["prompt_token_ids"] == ref.prompt_token_ids and head["output_token_ids"] == ref.output_token_ids
            assert torch.equal(pre.runner.read_blocks(blocks), ref.data)
        ph = {}
        kv, ack = fetch_kv(agent.addr, "a", 0, phases=ph, direct=True)
        assert ph["path"] == "bytes" and torch.equal(kv.data, pre.export_kv("a").data)
        ack()
    finally:
        agent.close()


def test_copy_blocks_matches_index_select():
    """The direct path's per-run contiguous copies give exactly `index_select` over the block axis, for
    one run, a few runs, and a fragmented list past the run limit (the gather kernel's branch)."""
    import torch

    from tandem.transfer.kv import MAX_COPY_RUNS, _block_runs, copy_blocks
    cache = torch.randn(3, 2, 40, 4, 2, 5)
    frag = list(range(0, 2 * (MAX_COPY_RUNS + 2), 2))
    for blocks in ([7, 8, 9, 10], [3, 4, 20, 21, 22, 5], frag, []):
        ref = cache.index_select(2, torch.tensor(blocks, dtype=torch.long))
        assert torch.equal(copy_blocks(cache, blocks), ref)
    assert _block_runs([5, 6, 7, 9, 10, 2]) == [(5, 0, 3), (9, 3, 2), (2, 5, 1)]
    assert len(_block_runs(frag)) > MAX_COPY_RUNS


def test_ack_never_waits_for_the_engine_lock(llama_dir):
    """An ack arriving while the worker loop holds the engine lock (a step in flight) is answered at once
    and its release is queued; the worker loop applies it (`completed()` under the lock)."""
    import time as _t

    from tandem.transfer.agent import TransferAgent
    pre = Engine(EngineConfig(llama_dir, device="cpu"))
    lock = threading.Lock()
    agent = TransferAgent(pre, lock)
    try:
        pre.add_request("a", list(range(9, 9 + 40)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                        hold_kv=True)
        drain(pre)
        kv, ack = fetch_kv(agent.addr, "a", 0)
        with lock:                                   # the engine is "stepping"
            t0 = _t.perf_counter()
            ack()
            assert _t.perf_counter() - t0 < 2.0      # answered without the lock
            assert "a" in pre.held                   # not yet freed: queued
            agent.completed()                        # the worker loop's poll, under the lock
            assert "a" not in pre.held
    finally:
        agent.close()
