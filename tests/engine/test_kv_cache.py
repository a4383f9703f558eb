"""Property tests on the block pool and prefix cache: no leaks, no negative refs, correct reuse."""
from hypothesis import given, settings, strategies as st

from tandem.common.hashing import block_hashes
from tandem.common.sampling import SamplingParams
from tandem.engine.kv_cache import BlockPool, KVCacheManager
from tandem.engine.request import Request
from tandem.engine.scheduler import Scheduler

BS = 4


def _check_pool(pool: BlockPool):
    assert all(b.ref_cnt >= 0 for b in pool.blocks)
    free_ids = set(pool.free)
    assert free_ids == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
    for h, bid in pool.cached.items():
        assert pool.blocks[bid].block_hash == h


def test_lru_reuse_and_revival():
    kv = KVCacheManager(8, BS)
    r1 = Request("a", list(range(13)), SamplingParams())
    assert kv.match_prefix(r1) == 0
    assert kv.allocate_slots(r1, 13)
    r1.num_computed_tokens = 13
    kv.cache_full_blocks(r1)
    assert len(kv.pool.cached) == 3
    kv.free(r1)
    assert kv.pool.num_free == 8 and kv.pool.num_cached_free == 3
    # same prefix revives the cached blocks
    r2 = Request("b", list(range(12)) + [99, 98], SamplingParams())
    assert kv.match_prefix(r2) == 12
    assert kv.pool.num_free == 5
    # a full-prompt hit still leaves one token to compute
    r3 = Request("c", list(range(12)), SamplingParams())
    assert kv.match_prefix(r3) == 8
    kv.free(r2), kv.free(r3)
    # exhausting the pool evicts the LRU cached blocks and reports them
    r4 = Request("d", [7] * 32, SamplingParams())
    assert kv.allocate_slots(r4, 32)
    stored, removed = kv.pool.drain_events()
    assert len(stored) == 3 and sorted(removed) == sorted(stored)
    assert kv.pool.cached == {}
    _check_pool(kv.pool)


def test_hash_is_router_function():
    kv = KVCacheManager(8, BS)
    toks = list(range(10))
    r = Request("a", toks, SamplingParams())
    assert kv.prefix_hashes(r, 8) == block_hashes(toks, BS)


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "preempt"]), st.integers(0, 50),
                         st.integers(1, 30)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_no_leaks_under_random_ops(seq):
    """Any sequence of add/step/abort/preempt leaves refcounts sane and frees everything at the end."""
    kv = KVCacheManager(12, BS)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16, aging_s=0)
    live: list[Request] = []
    n = 0
    for op, a, b in seq:
        if op == "add":
            # shared prefixes: token ids drawn from a small alphabet
            toks = [(a + i) % 5 for i in range(b)]
            r = Request(f"r{n}", toks, SamplingParams(max_tokens=3), ["interactive", "batch"][a % 2])
            n += 1
            sched.add(r)
            live.append(r)
        elif op == "step":
            batch = sched.schedule()
            for r, k in zip(batch.reqs, batch.num_new_tokens):
                r.num_computed_tokens += k
                kv.cache_full_blocks(r)
                if r.num_computed_tokens == r.num_tokens:
                    r.append_token(a % 5)
                    if r.num_output_tokens >= 3:
                        sched.remove(r)
                        live.remove(r)
        elif op == "abort" and live:
            r = live.pop(a % len(live))
            sched.remove(r)
        elif op == "preempt" and sched.running:
            from tandem.engine.scheduler import ScheduledBatch
            sched._preempt(sched.running[a % len(sched.running)], ScheduledBatch())
        _check_pool(kv.pool)
        used = sum(len(r.block_table) for r in live)
        shared_ok = kv.pool.num_used <= used
        assert shared_ok
    for r in list(live):
        sched.remove(r)
    assert kv.pool.num_free == kv.pool.num_blocks
    _check_pool(kv.pool)
