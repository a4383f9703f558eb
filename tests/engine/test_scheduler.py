"""Scheduler behaviour without a model: priorities, preemption, aging, chunking."""
from tandem.common.sampling import SamplingParams
from tandem.engine.kv_cache import KVCacheManager
from tandem.engine.request import Request
from tandem.engine.scheduler import Scheduler


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def run_step(sched):
    """Apply a schedule as the engine would: compute, sample a token, finish at max_tokens."""
    batch = sched.schedule()
    done = []
    for r, k in zip(batch.reqs, batch.num_new_tokens):
        r.num_computed_tokens += k
        sched.kv.cache_full_blocks(r)
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(1)
            if r.num_output_tokens >= r.params.max_tokens:
                sched.remove(r)
                done.append(r)
    return batch, done


def mk(rid, n, prio, max_tokens=50, clock=None):
    base = 1000 * (sum(map(ord, rid)) % 97)          # distinct prompts: no accidental prefix hits
    r = Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens), prio)
    r.arrival_time = clock() if clock else 0.0
    return r


def test_interactive_admitted_within_one_step_when_batch_full():
    clk = Clock()
    sched = Scheduler(KVCacheManager(64, 16), max_num_seqs=4, max_num_batched_tokens=64, aging_s=0, clock=clk)
    for i in range(4):
        sched.add(mk(f"b{i}", 8, "batch", clock=clk))
    run_step(sched)
    assert len(sched.running) == 4
    clk.t = 1.0
    sched.add(mk("chat", 8, "interactive", clock=clk))
    batch, _ = run_step(sched)
    assert "chat" in [r.request_id for r in batch.reqs]
    assert batch.reqs[0].request_id == "chat"


def test_interactive_preempts_batch_when_kv_full():
    clk = Clock()
    # 8 blocks of 4 tokens; two batch requests hold 4 blocks each
    sched = Scheduler(KVCacheManager(8, 4), max_num_seqs=8, max_num_batched_tokens=64, aging_s=0, clock=clk)
    sched.add(mk("b0", 15, "batch", clock=clk))
    sched.add(mk("b1", 15, "batch", clock=clk))
    run_step(sched)
    assert sched.kv.pool.num_free == 0
    clk.t = 1
    sched.add(mk("chat", 6, "interactive", clock=clk))
    batch, _ = run_step(sched)
    ids = [r.request_id for r in batch.reqs]
    assert ids[0] == "chat"
    assert [r.request_id for r in batch.preempted] == ["b1"]      # the later batch request goes first
    assert sched.num_preemptions == 1


def test_chunked_prefill_interleaves_decodes_and_interactive_waits_one_chunk():
    clk = Clock()
    sched = Scheduler(KVCacheManager(256, 16), max_num_seqs=8, max_num_batched_tokens=32, aging_s=0, clock=clk)
    sched.add(mk("d", 4, "interactive", clock=clk))
    run_step(sched)                               # d prefilled, now decoding
    sched.add(mk("long", 200, "batch", clock=clk))
    batch, _ = run_step(sched)
    assert dict(zip([r.request_id for r in batch.reqs], batch.num_new_tokens)) == {"d": 1, "long": 31}
    sched.add(mk("chat", 20, "interactive", clock=clk))
    batch, _ = run_step(sched)
    got = dict(zip([r.request_id for r in batch.reqs], batch.num_new_tokens))
    assert got["chat"] == 20 and got["d"] == 1 and got["long"] == 11


def test_batch_work_finishes_under_steady_interactive_stream():
    clk = Clock()
    sched = Scheduler(KVCacheManager(64, 16), max_num_seqs=2, max_num_batched_tokens=64, aging_s=5, clock=clk)
    sched.add(mk("batch", 10, "batch", max_tokens=5, clock=clk))
    finished = set()
    for step in range(400):
        clk.t = step * 0.1
        if step % 2 == 0:                          # a new interactive request every other step, forever
            sched.add(mk(f"i{step}", 10, "interactive", max_tokens=4, clock=clk))
        _, done = run_step(sched)
        finished |= {r.request_id for r in done}
        if "batch" in finished:
            break
    assert "batch" in finished, "batch request starved"


def test_waiting_request_that_does_not_fit_blocks_lower_admissions():
    clk = Clock()
    sched = Scheduler(KVCacheManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64, aging_s=0, clock=clk)
    sched.add(mk("i0", 12, "interactive", clock=clk))       # 3 blocks (+1 after first token)
    run_step(sched)
    sched.add(mk("i1", 12, "interactive", clock=clk))       # needs 3 blocks: does not fit
    sched.add(mk("b", 2, "batch", clock=clk))               # would fit, but must not bypass i1
    batch, _ = run_step(sched)
    assert [r.request_id for r in batch.reqs] == ["i0"]
    assert [r.request_id for r in sched.waiting] == ["i1", "b"]


def test_prefill_chunk_is_capped_only_next_to_decodes():
    """A decode worker that takes a long prompt (a spill at a long prefill queue) carries at most
    `prefill_chunk_while_decoding` prompt tokens a step while it decodes, so its chats keep their TPOT;
    alone, the prompt gets the whole step budget. Nothing is lost: the prompt finishes either way."""
    clk = Clock()
    sched = Scheduler(KVCacheManager(256, 16), max_num_seqs=8, max_num_batched_tokens=256, aging_s=0,
                      clock=clk, prefill_chunk_while_decoding=32)
    for i in range(3):
        sched.add(mk(f"chat{i}", 8, "interactive", max_tokens=12, clock=clk))
    run_step(sched)                                      # the chats' prompts: now they decode
    sched.add(mk("doc", 600, "batch", max_tokens=1, clock=clk))
    prompt_tokens = []
    while any(r.request_id == "doc" for r in sched.waiting + sched.running):
        batch, _ = run_step(sched)
        rows = dict(zip((r.request_id for r in batch.reqs), batch.num_new_tokens))
        decodes = [k for rid, k in rows.items() if rid != "doc"]
        assert all(k == 1 for k in decodes)
        if "doc" in rows:
            prompt_tokens.append((rows["doc"], len(decodes)))
    assert sum(k for k, _ in prompt_tokens) == 600
    assert all(k <= 32 for k, d in prompt_tokens if d)            # next to decodes: capped
    assert any(k > 32 for k, d in prompt_tokens if not d)         # the chats done: the full budget
    # the chats decoded in every step until they finished
    assert [d for _, d in prompt_tokens[:10]] == [3] * 10
