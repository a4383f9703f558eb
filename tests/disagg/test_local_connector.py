"""The planner's local connector over real worker processes (tiny model, CPU): the only prefill
worker flips to decode while it prefills (its prompts are handed off as usual, then everything is
prefilled locally); a started worker is `starting` then takes work; a stopped decode worker drains — its streaming decodes
move to another decode worker with their KV — and exits, with every request finished, token-identical
to the same greedy requests run afterwards, and no worker counted dead or request retried."""
from __future__ import annotations

import asyncio
import time

from tandem.common.sampling import SamplingParams
from tandem.frontend.client import EngineClient
from tandem.frontend.planning import LocalConnector
from tandem.router.kv_router import KvRouter, RouterConfig
from tandem.runtime.base import WorkerSpec
from tandem.runtime.local import LocalRuntime

ENGINE = {"device": "cpu", "cpu_threads": 1, "max_num_seqs": 16, "max_model_len": 512}
N_TOK = 40


async def _until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _collect(h) -> tuple[list[int], str | None]:
    toks: list[int] = []
    err = None
    try:
        async for d in h:
            toks.extend(d.new_token_ids)
            err = err or d.error
    finally:
        h.close()
    return toks, err


def _submit(client, rid, prompt):
    sp = SamplingParams(max_tokens=N_TOK, temperature=0.0, ignore_eos=True).to_dict()
    return client.submit(rid, prompt, sp)


async def _scenario(model_dir: str) -> None:
    rt = LocalRuntime()
    client = EngineClient(rt.out_addr, KvRouter(RouterConfig(seed=0)), rt)
    await client.start()
    next_id = [2]

    def spawn(role):
        wid = f"w{next_id[0]}"
        next_id[0] += 1
        client.expect_worker(wid, role)
        rt.start_worker(WorkerSpec(wid, model_dir, role, dict(ENGINE)))
        return wid

    try:
        for wid, role in (("w0", "prefill"), ("w1", "decode")):
            client.expect_worker(wid, role)
            rt.start_worker(WorkerSpec(wid, model_dir, role, dict(ENGINE)))
        assert await client.wait_ready(2, timeout=120)
        conn = LocalConnector(client, spawn=spawn, terminate=rt.stop_worker)

        # ---- the prefill pool empties while it prefills: its prompts finish there and are handed off
        long_prompts = [[(11 * i + j) % 200 + 10 for j in range(300 + i)] for i in range(3)]
        lh = [_submit(client, f"l{i}", p) for i, p in enumerate(long_prompts)]
        assert all(h.phase == "prefill" and h.worker_id == "w0" for h in lh)
        conn.flip("w0", "decode")
        louts = await asyncio.wait_for(asyncio.gather(*[_collect(h) for h in lh]), 120)
        assert all(err is None and len(t) == N_TOK for t, err in louts), louts
        await _until(lambda: [v.state for v in conn.workers() if v.worker_id == "w0"] == ["active"], 30,
                     "the flip to complete")
        assert client.workers["w0"].role == "decode" and client.num_handoffs >= 3
        assert not client.alive_workers(("prefill",))

        # ---- start: `starting` until Ready, then an active decode worker that gets work
        new = conn.start_worker("decode")
        assert new == "w2"
        assert [v.state for v in conn.workers() if v.worker_id == new] == ["starting"]
        await _until(lambda: client.workers[new].alive, 120, "the started worker")
        views = {v.worker_id: v for v in conn.workers()}
        assert views[new].state == "active" and views[new].role == "decode"
        assert [e["event"] for e in conn.scaling] == ["start", "started"]

        # ---- stop a decode worker while it streams: drained, decodes migrated, nothing lost
        prompts = [[(7 * i + j) % 200 + 10 for j in range(24 + i)] for i in range(8)]
        handles = [_submit(client, f"a{i}", p) for i, p in enumerate(prompts)]
        runs = [asyncio.ensure_future(_collect(h)) for h in handles]
        await _until(lambda: any(len(h.output_token_ids) >= 4 for h in handles), 60, "first tokens")
        on = {w: sum(1 for h in handles if h.worker_id == w) for w in ("w0", "w1", "w2")}
        victim = max(on, key=on.get)
        assert on[victim] > 0
        conn.stop_worker(victim)
        assert [v.state for v in conn.workers() if v.worker_id == victim] == ["draining"]
        outs = await asyncio.wait_for(asyncio.gather(*runs), 120)
        assert all(err is None for _, err in outs), outs
        assert all(len(t) == N_TOK for t, _ in outs), [len(t) for t, _ in outs]
        await _until(lambda: client.workers[victim].state == "stopped" and victim in rt.exited()
                     and conn.scaling[-1]["event"] == "stopped", 60, "the stopped worker to exit")
        assert client.num_migrations >= 1                 # its decodes moved with their KV
        assert client.num_worker_deaths == 0 and client.num_retried == 0
        assert victim not in {v.worker_id for v in conn.workers()}
        assert [e["event"] for e in conn.scaling][-2:] == ["drain", "stopped"]

        # the same greedy requests on what is left: the same tokens (no request restarted wrongly)
        again = await asyncio.gather(*[_collect(_submit(client, f"b{i}", p)) for i, p in enumerate(prompts)])
        assert [t for t, _ in again] == [t for t, _ in outs]
        again = await asyncio.gather(*[_collect(_submit(client, f"m{i}", p)) for i, p in enumerate(long_prompts)])
        assert [t for t, _ in again] == [t for t, _ in louts]            # prefilled locally this time
    finally:
        await client.stop()
        rt.shutdown()


def test_local_connector_starts_and_stops_workers_losing_nothing(llama_dir):
    asyncio.run(_scenario(llama_dir))
