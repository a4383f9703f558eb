"""Property test: random add/step/abort/detach on a real engine with asynchronous scheduling on
(steps in flight while requests come and go) never leaks or double-frees KV blocks."""
from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from tandem.common.sampling import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine


@pytest.fixture(scope="module")
def async_engine(llama_dir):
    return Engine(EngineConfig(llama_dir, device="cpu", async_scheduling=True, num_kv_blocks=10, block_size=8,
                               max_num_seqs=4, max_num_batched_tokens=24))


ops = st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort", "detach"]),
                         st.integers(0, 50), st.integers(1, 40)), min_size=4, max_size=24)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops, st.booleans())
def test_no_leaks_under_random_ops_async(async_engine, seq, finish):
    """Random add/step/abort/detach on a real engine with async scheduling on and a tiny pool
    (10 blocks of 8 tokens: preemption and fallbacks happen): refcounts stay sane and every block comes back."""
    eng = async_engine
    pool = eng.kv.pool
    n = 0
    done: dict[str, int] = {}
    want: dict[str, int] = {}

    def run(k):
        for _ in range(k):
            for d in eng.step():
                done[d.request_id] = done.get(d.request_id, 0) + len(d.new_token_ids)
                if d.finish_reason == "length":              # no token lost or doubled on the way
                    assert done[d.request_id] == want[d.request_id], d
    for op, a, b in seq:
        live = sorted(eng.requests)
        if op == "add":
            rid = f"h{n}"
            n += 1
            want[rid] = a % 9 + 1
            eng.add_request(rid, [(a + i) % 7 + 3 for i in range(b)],
                            SamplingParams(temperature=0, max_tokens=a % 9 + 1, ignore_eos=True,
                                           stop_token_ids=[a % 7 + 3] if a % 3 == 0 else []),
                            ["interactive", "batch"][a % 2])
        elif op == "step":
            run(b % 4 + 1)
        elif op == "abort" and live:
            eng.abort_request(live[a % len(live)])
        elif op == "detach" and live:
            rid = live[a % len(live)]
            eng.detach_request(rid)
            eng.release_kv(rid)
        held = sum(len(r.block_table) for r in eng.requests.values()) + \
            sum(len(r.block_table) for r in eng.held.values())
        assert 0 <= pool.num_used <= held
    if not finish:                                      # else: run everything to completion
        for rid in list(eng.requests):
            eng.abort_request(rid)
    while eng.has_unfinished_requests():
        run(1)
    for rid in list(eng.held):
        eng.release_kv(rid)
    assert pool.num_free == pool.num_blocks
    assert not eng.requests and eng._inflight is None
