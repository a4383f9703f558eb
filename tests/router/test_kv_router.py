"""KvRouter scoring: cache attraction, load spreading (Dynamo #737), pools, modes, properties."""
from __future__ import annotations

import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.common.hashing import block_hashes
from tandem.router.kv_router import KvRouter, NoWorkers, RouterConfig, RouterWeights, kv_cost, pool_roles

BS = 16


def make_router(n=2, mode="kv", **kw) -> KvRouter:
    r = KvRouter(RouterConfig(mode=mode, seed=0, **kw))
    for i in range(n):
        r.add_worker(f"w{i}", "both", BS, num_kv_blocks=4096, max_num_seqs=256)
    return r


def route(r: KvRouter, tokens: list[int], rid: str, pool="both") -> str:
    hs = block_hashes(tokens, BS)
    wid, ov = r.select(hs, len(tokens), pool)
    r.on_assign(wid, rid, hs, len(tokens), ov)
    return wid


SYSTEM = list(range(1000, 1000 + 32 * BS))     # a 512-token shared system prompt


def test_router_is_torch_free():
    import subprocess
    code = "import sys, tandem.router, tandem.frontend.api, tandem.frontend.client; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cached_prefix_attracts():
    r = make_router(3)
    prompt = list(range(5, 5 + 10 * BS))
    r.apply_kv_events("w2", block_hashes(prompt, BS), [])
    assert route(r, prompt + [1, 2, 3], "a") == "w2"
    # a different prompt has no cached prefix anywhere: goes to an idle worker, not the busy w2
    assert route(r, list(range(7000, 7000 + 5 * BS)), "b") in ("w0", "w1")


def test_eviction_events_remove_blocks():
    r = make_router(2)
    prompt = list(range(10 * BS))
    hs = block_hashes(prompt, BS)
    r.apply_kv_events("w1", hs, [])
    assert r.scores(hs, len(prompt))["w1"][1] == 10
    r.apply_kv_events("w1", [], hs[4:5])                 # block 4 evicted: prefix match stops at 4
    assert r.scores(hs, len(prompt))["w1"][1] == 4


def test_shared_system_prompt_spreads_dynamo_737():
    """All requests share a long system prompt cached on w0 only: the burst must still spread."""
    r = make_router(2)
    r.apply_kv_events("w0", block_hashes(SYSTEM, BS), [])
    picks = Counter(route(r, SYSTEM + [7, i, i + 1, 9] * 8, f"r{i}") for i in range(16))
    assert picks["w0"] >= 4 and picks["w1"] >= 4, picks
    assert abs(picks["w0"] - picks["w1"]) <= 2, picks


def test_burst_on_identical_idle_workers_round_robins():
    r = make_router(4)
    picks = Counter(route(r, SYSTEM + [i], f"r{i}") for i in range(40))
    assert set(picks.values()) == {10}, picks


def test_finishing_releases_load():
    r = make_router(2)
    a = route(r, list(range(100, 100 + 20 * BS)), "a")
    b = route(r, list(range(900, 900 + 2 * BS)), "b")
    assert a != b
    r.on_finish(a, "a")
    # now the worker that had the big request is idle again and wins the next cold request
    assert route(r, list(range(3000, 3000 + 3 * BS)), "c") == a


def test_prefill_to_decode_transition_lowers_cost():
    r = make_router(1)
    prompt = list(range(10 * BS))
    route(r, prompt, "a")
    w = r.workers["w0"]
    assert w.prefill_blocks == 10 and w.active_blocks == 10
    r.on_first_token("w0", "a")
    assert w.prefill_blocks == 0
    r.on_tokens("w0", "a", 3 * BS)
    assert w.active_blocks == 13


def test_reported_load_is_a_floor():
    r = make_router(2)
    r.update_load("w0", {"waiting_prefill_tokens": 50 * BS, "kv_blocks_used": 100, "num_running": 3,
                         "num_waiting": {"interactive": 2}})
    assert route(r, list(range(4 * BS)), "a") == "w1"


def test_full_worker_avoided_and_pools():
    r = KvRouter(RouterConfig(seed=0))
    r.add_worker("p", "prefill", BS, 100, 2)
    r.add_worker("d", "decode", BS, 100, 2)
    r.add_worker("b", "both", BS, 100, 1)
    assert pool_roles("prefill") == ("prefill", "both")
    assert {w.worker_id for w in r.candidates("prefill")} == {"p", "b"}
    assert {w.worker_id for w in r.candidates("decode")} == {"d", "b"}
    assert [w.worker_id for w in r.candidates("both")] == ["b"]
    route(r, [1] * BS, "x", pool="both")             # b now at its max_num_seqs (1)
    prompt = list(range(3 * BS))
    r.apply_kv_events("b", block_hashes(prompt, BS), [])
    assert route(r, prompt, "y", pool="prefill") == "p"     # b is full even though it has the cache
    r.remove_worker("p")
    r.remove_worker("d")
    assert route(r, prompt, "z", pool="prefill") == "b"     # everyone full: still served
    with pytest.raises(NoWorkers):
        r.select([], 1, pool="decode", exclude=["b"])
    with pytest.raises(ValueError):
        pool_roles("nope")


def test_modes():
    r = make_router(3, mode="round-robin")
    assert [route(r, [1, 2, 3], f"r{i}") for i in range(6)] == ["w0", "w1", "w2"] * 2
    r = make_router(3, mode="least-loaded")
    assert [route(r, [1], x) for x in "abc"] == ["w0", "w1", "w2"]
    r.on_finish("w1", "b")
    assert route(r, [1], "d") == "w1"                  # the only idle worker
    with pytest.raises(ValueError):
        RouterConfig(mode="random")


def test_predicted_blocks_expire():
    r = make_router(2, predict_ttl_s=0.0)
    prompt = list(range(6 * BS))
    w = route(r, prompt, "a")
    r.on_finish(w, "a")
    # prediction expired immediately and no stored event came: no cache credit
    assert all(ov == 0 for _, ov in r.scores(block_hashes(prompt, BS), len(prompt)).values())
    r.apply_kv_events(w, block_hashes(prompt, BS), [])
    assert r.scores(block_hashes(prompt, BS), len(prompt))[w][1] == 6


def test_softmax_temperature_still_prefers_cheaper():
    r = make_router(2, weights=RouterWeights(temperature=0.2))
    prompt = list(range(30 * BS))
    r.apply_kv_events("w1", block_hashes(prompt, BS), [])
    picks = Counter()
    for i in range(200):
        wid, _ = r.select(block_hashes(prompt, BS), len(prompt))
        picks[wid] += 1
    assert picks["w1"] > picks["w0"]


# ---------------------------------------------------------------------------------- properties
loads = st.tuples(st.integers(0, 500), st.integers(0, 5000))


@given(p=st.integers(0, 300), o=st.integers(0, 300), load=loads, extra=st.integers(1, 50))
def test_cost_monotone(p, o, load, extra):
    o = min(o, p)
    w = RouterWeights()
    base = kv_cost(p, o, load[0], load[1], w)
    if o + extra <= p:
        assert kv_cost(p, o + extra, load[0], load[1], w) < base      # more cache never costs more
    assert kv_cost(p, o, load[0] + extra, load[1], w) > base          # more queued prefill costs more
    assert kv_cost(p, o, load[0], load[1] + extra, w) > base          # more decode load costs more


@settings(max_examples=60, deadline=None)
@given(n_workers=st.integers(1, 6), n_reqs=st.integers(1, 40), shared=st.integers(0, 40),
       cached_on=st.integers(0, 5), mode=st.sampled_from(["kv", "round-robin", "least-loaded"]))
def test_select_valid_and_balanced(n_workers, n_reqs, shared, cached_on, mode):
    r = make_router(n_workers, mode=mode)
    system = list(range(50_000, 50_000 + shared * BS))
    if cached_on < n_workers:
        r.apply_kv_events(f"w{cached_on}", block_hashes(system, BS), [])
    picks = Counter()
    for i in range(n_reqs):
        wid = route(r, system + [i % 4000, 7, 7, 7], f"r{i}")
        assert wid in r.workers
        picks[wid] += 1
    # no worker gets far more than its share (a burst of equal requests spreads, cache or not)
    fair = n_reqs / n_workers
    assert max(picks.values()) <= fair + 2 + (1 if mode == "kv" else 0), picks


@settings(max_examples=40, deadline=None)
@given(perm=st.permutations(["w0", "w1", "w2", "w3"]), cached=st.sampled_from(["w0", "w1", "w2", "w3"]))
def test_choice_follows_the_cache_not_the_name(perm, cached):
    r = KvRouter(RouterConfig(seed=0))
    for wid in perm:
        r.add_worker(wid, "both", BS, 4096, 256)
    prompt = list(range(20 * BS))
    r.apply_kv_events(cached, block_hashes(prompt, BS), [])
    assert r.select(block_hashes(prompt, BS), len(prompt))[0] == cached
