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
