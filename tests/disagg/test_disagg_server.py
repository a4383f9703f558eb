"""Disaggregated serving on CPU: a real `tandem serve --prefill 1 --decode 1` with two worker processes.

Greedy output equals aggregated serving (with and without prefix-cache hits), transfers really move
KV (counted), injected transfer failures fall back to recompute, and a prefill worker killed
mid-flight loses no request."""
import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest

from tandem import LLM, SamplingParams
from tests.frontend.serverutil import ServerProc


def prompts(n, length, seed):
    import random
    r = random.Random(seed)
    return [[r.randrange(10, 250) for _ in range(length)] for _ in range(n)]


@pytest.fixture(scope="module")
def disagg(llama_dir):
    # threshold 8: prompts of > 8 uncached tokens are prefilled remotely
    s = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", "--prefill", "1", "--decode", "1",
                    "--local-prefill-max-tokens", "8"], workers=2)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def complete(server, prompt, max_tokens=12, **extra):
    r = httpx.post(server.base_url + "/completions", timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_roles_and_pools(disagg):
    c = disagg.cluster()
    assert sorted(w["role"] for w in c["workers"]) == ["decode", "prefill"]
    assert c["pools"]["prefill"] == 1 and c["pools"]["decode"] == 1


def test_token_identical_to_aggregated_with_and_without_prefix_hits(disagg, llama_dir):
    llm = LLM(llama_dir, device="cpu")
    base = prompts(1, 40, 1)[0]
    ps = prompts(3, 33, 2) + [base, base + [7, 8, 9] * 7, base[:32] + [11] * 30]    # last two share blocks
    ref = llm.generate(ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    before = disagg.cluster()["totals"]
    for p, o in zip(ps, ref):
        got = complete(disagg, p)
        assert got["choices"][0]["token_ids"] == o.token_ids
        assert got["choices"][0]["text"] == o.text
    after = disagg.cluster()["totals"]
    assert after["kv_handoffs"] - before["kv_handoffs"] == len(ps)
    assert after["disagg_decisions"].get("remote", 0) >= len(ps)
    # the decode worker already held the shared blocks: later transfers moved less than whole prompts
    m = httpx.get(disagg.url + "/metrics").text
    assert "tandem_kv_transfer_bytes" in m and "tandem_disagg_decisions" in m


def test_short_prompt_prefills_locally(disagg, llama_dir):
    before = disagg.cluster()["totals"]["disagg_decisions"].get("local_short_uncached", 0)
    p = [12, 13, 14, 15]
    ref = LLM(llama_dir, device="cpu").generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert complete(disagg, p, 6)["choices"][0]["token_ids"] == ref.token_ids
    assert disagg.cluster()["totals"]["disagg_decisions"]["local_short_uncached"] == before + 1


def test_short_batch_request_is_served_whole_on_the_prefill_worker(disagg, llama_dir):
    """A batch request with a short answer stays on its prefill worker (no KV transfer, no decode-pool
    step); a longer one, and an interactive one, go through the handoff. Output is greedy-identical."""
    llm = LLM(llama_dir, device="cpu")
    p = prompts(1, 40, 9)[0]
    ref = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    before = disagg.cluster()["totals"]
    got = complete(disagg, p, priority="batch")
    assert got["choices"][0]["token_ids"] == ref.token_ids
    mid = disagg.cluster()["totals"]
    assert mid["disagg_decisions"].get("batch_on_prefill", 0) == before["disagg_decisions"].get("batch_on_prefill", 0) + 1
    assert mid["kv_handoffs"] == before["kv_handoffs"]
    complete(disagg, prompts(1, 40, 10)[0], max_tokens=300, priority="batch")    # over the 256 limit
    complete(disagg, prompts(1, 40, 11)[0], priority="interactive")
    after = disagg.cluster()["totals"]
    assert after["kv_handoffs"] == mid["kv_handoffs"] + 2
    assert after["disagg_decisions"]["batch_on_prefill"] == mid["disagg_decisions"]["batch_on_prefill"]


def test_streaming_through_handoff(disagg, llama_dir):
    import openai
    p = prompts(1, 50, 5)[0]
    ref = LLM(llama_dir, device="cpu").generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    cli = openai.OpenAI(base_url=disagg.base_url, api_key="x", max_retries=0)
    text, usage = "", None
    for ch in cli.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0, stream=True,
                                     stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if ch.choices:
            text += ch.choices[0].text
        if ch.usage:
            usage = ch.usage
    assert text == ref.text
    assert usage.completion_tokens == 10 and usage.prompt_tokens == 50


def test_killing_prefill_worker_loses_no_request(llama_dir):
    s = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", "--prefill", "1", "--decode", "1",
                    "--local-prefill-max-tokens", "8"], workers=2)
    # the killed process is seen through the runtime (process exit), not a heartbeat timeout: a short
    # --heartbeat-timeout made the *live* decode worker look dead on a loaded 2-core box while it
    # recomputed the 16 orphaned prompts
    try:
        s.wait_ready()
        pre = next(w for w in s.cluster()["workers"] if w["role"] == "prefill")
        ps = prompts(16, 200, 9)
        ref = LLM(llama_dir, device="cpu").generate(ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        with cf.ThreadPoolExecutor(16) as ex:
            futs = [ex.submit(complete, s, p, 24) for p in ps]
            time.sleep(0.15)
            os.kill(pre["pid"], signal.SIGKILL)
            results = [f.result() for f in futs]
        for r, o in zip(results, ref):
            assert r["choices"][0]["token_ids"] == o.token_ids
        deadline = time.monotonic() + 10
        while next(w for w in s.cluster()["workers"] if w["id"] == pre["id"])["alive"]:
            assert time.monotonic() < deadline, "killed worker never marked dead"
            time.sleep(0.2)
        # the server keeps serving with the decode worker alone
        assert complete(s, ps[0], 24)["choices"][0]["token_ids"] == ref[0].token_ids
    finally:
        s.stop()


def test_stop_string_spanning_the_handoff_is_never_streamed(disagg, llama_dir):
    """The first token comes from the prefill worker, the rest from the decode worker: a stop string that
    starts in the first token's text and ends in the second must not leak its start to the client."""
    import openai
    llm = LLM(llama_dir, device="cpu")
    case = None
    for seed in range(40):
        p = prompts(1, 30, 100 + seed)[0]
        full = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
        first = llm.generate([p], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0].text
        if first and len(full) > len(first) and full.startswith(first):
            stop = first[-1] + full[len(first)]
            if full.index(stop) == len(first) - 1:         # its first occurrence spans the two tokens
                case = p, stop
                break
    assert case is not None, "no prompt whose first two tokens both have text"
    p, stop = case
    ref = llm.generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop]))[0]
    assert ref.text == first[:-1]
    before = disagg.cluster()["totals"]["kv_handoffs"]
    cli = openai.OpenAI(base_url=disagg.base_url, api_key="x", max_retries=0)
    chunks = [ch.choices[0].text for ch in cli.completions.create(
        model="tiny", prompt=p, max_tokens=8, temperature=0, stream=True, stop=[stop],
        extra_body={"ignore_eos": True}) if ch.choices]
    assert "".join(chunks) == ref.text
    assert complete(disagg, p, 8, stop=[stop])["choices"][0]["text"] == ref.text       # non-streaming too
    assert disagg.cluster()["totals"]["kv_handoffs"] == before + 2                    # both went through a handoff


def test_spill_batch_prefills_on_the_decode_worker_when_the_prefill_queue_is_long(llama_dir):
    """`--spill-batch`: a flood of batch prompts that backs up the one prefill worker sends some of
    them to the decode worker, which prefills them in its own capped steps (--prefill-chunk-while-
    decoding). Every answer is greedy-identical to aggregated serving; the decisions are counted."""
    s = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", "--prefill", "1", "--decode", "1",
                    "--local-prefill-max-tokens", "8", "--batch-on-prefill-max-tokens", "0", "--spill-batch",
                    "--prefill-chunk-while-decoding", "32"], workers=2)
    try:
        s.wait_ready()
        ps = prompts(32, 180, 21)
        ref = LLM(llama_dir, device="cpu").generate(ps, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        with cf.ThreadPoolExecutor(32) as ex:
            results = list(ex.map(lambda p: complete(s, p, 16, priority="batch"), ps))
        for r, o in zip(results, ref):
            assert r["choices"][0]["token_ids"] == o.token_ids
        d = s.cluster()["totals"]["disagg_decisions"]
        assert d.get("local_prefill_queue_long", 0) >= 1, d
        assert d.get("remote", 0) >= 1, d
        assert d.get("local_prefill_queue_long", 0) + d.get("remote", 0) == len(ps)
    finally:
        s.stop()
