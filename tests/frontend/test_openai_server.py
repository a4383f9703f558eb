"""The official `openai` client against a live `tandem serve` (one worker, tiny model)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tandem import SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5", "def fib(n):"]


def _greedy_completion(oai, prompt, **kw):
    extra = kw.pop("extra_body", {})
    return oai.completions.create(model="tiny", prompt=prompt, temperature=0, extra_body=extra, **kw)


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_and_cluster(server, oai):
    ms = oai.models.list()
    assert [m.id for m in ms.data] == ["tiny"]
    assert oai.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"   # no key needed
    c = server.cluster()
    assert c["totals"]["workers_alive"] == 1
    assert c["workers"][0]["role"] == "both"
    assert c["planner"]["enabled"] is False


def test_completion_usage_and_token_ids(oai, tokenizer):
    prompt = "Hello, my name is"
    r = _greedy_completion(oai, prompt, max_tokens=12, extra_body={"ignore_eos": True, "return_token_ids": True})
    ch = r.choices[0]
    assert r.object == "text_completion" and r.model == "tiny"
    assert ch.finish_reason == "length"
    ids = tokenizer.encode(prompt)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12
    extra = ch.model_extra
    assert extra["prompt_token_ids"] == ids
    assert len(extra["token_ids"]) == 12
    assert ch.text == tokenizer.decode(extra["token_ids"])


def test_completion_stream_equals_non_stream(oai):
    kw = dict(max_tokens=16, extra_body={"ignore_eos": True})
    full = _greedy_completion(oai, "The capital of France is", **kw)
    chunks = list(oai.completions.create(model="tiny", prompt="The capital of France is", temperature=0,
                                         stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_and_non_stream(oai, tokenizer):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    r = oai.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=10,
                                    extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    expected_prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(expected_prompt)
    assert r.usage.completion_tokens == 10
    stream = oai.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_completion_tokens=10,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_greedy_server_equals_llm_generate(oai, llama_dir):
    from tandem import LLM
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = LLM(llama_dir).generate(PROMPTS, params)
    for p, want in zip(PROMPTS, ref):
        r = _greedy_completion(oai, p, max_tokens=20, extra_body={"ignore_eos": True, "return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == want.token_ids, p
        assert r.choices[0].text == want.text, p


def test_stop_strings_honoured(oai):
    base = _greedy_completion(oai, "1 2 3 4 5", max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    # a stop string that first occurs in the middle of the output
    k = len(base) // 2
    stop = base[k:k + 3]
    cut = base.find(stop)
    assert stop and 0 < cut
    r = _greedy_completion(oai, "1 2 3 4 5", max_tokens=30, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:cut]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(model="tiny", prompt="1 2 3 4 5", temperature=0, max_tokens=30,
                                         stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == base[:cut]
    # chat too
    msgs = [{"role": "user", "content": "count"}]
    cbase = oai.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=30,
                                        extra_body={"ignore_eos": True}).choices[0].message.content
    cstop = cbase[len(cbase) // 2:len(cbase) // 2 + 3]
    c = oai.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=30, stop=cstop,
                                    extra_body={"ignore_eos": True})
    assert c.choices[0].message.content == cbase[:cbase.find(cstop)]
    assert c.choices[0].finish_reason == "stop"


def test_seed_reproducible(oai):
    def gen(seed, stream=False):
        kw = dict(model="tiny", prompt="Once upon a time", temperature=1.0, top_p=0.95, max_tokens=24, seed=seed,
                  extra_body={"ignore_eos": True})
        if stream:
            return "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kw) if c.choices)
        return oai.completions.create(**kw).choices[0].text
    a, b, s = gen(1234), gen(1234), gen(1234, stream=True)
    assert a == b == s
    assert gen(99) != a
    msgs = [{"role": "user", "content": "tell me a story"}]
    c1 = oai.chat.completions.create(model="tiny", messages=msgs, seed=5, max_tokens=16, temperature=0.8)
    c2 = oai.chat.completions.create(model="tiny", messages=msgs, seed=5, max_tokens=16, temperature=0.8)
    assert c1.choices[0].message.content == c2.choices[0].message.content


def test_token_id_prompts_and_multiple_prompts(oai, tokenizer):
    ids = tokenizer.encode("The capital of France is")
    a = _greedy_completion(oai, ids, max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})
    b = _greedy_completion(oai, "The capital of France is", max_tokens=8, extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].model_extra["prompt_token_ids"] == ids
    r = _greedy_completion(oai, ["Hello, my name is", ids], max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == b.choices[0].text
    assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Hello, my name is"))


def test_logprobs(oai):
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=0,
                                    max_tokens=5, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(max(t.logprob for t in e.top_logprobs), abs=1e-4)   # greedy
    c = _greedy_completion(oai, "abc", max_tokens=4, logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text


def test_priority_and_extensions(oai):
    for prio in ("interactive", "standard", "batch"):
        r = _greedy_completion(oai, "hi", max_tokens=3, extra_body={"priority": prio, "min_tokens": 3})
        assert r.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        _greedy_completion(oai, "hi", max_tokens=3, extra_body={"priority": "urgent"})


# ---------------------------------------------------------------------------------------------- errors
def _post(server, path, body, headers=None, raw=None):
    h = dict(server.headers)
    h.update(headers or {})
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers={**h, "content-type": "application/json"},
                          timeout=30)
    return httpx.post(server.url + path, json=body, headers=h, timeout=30)


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"} and e["message"]
    return e


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny"}, "messages"),
    ({"model": "tiny", "messages": "hi"}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "min_tokens": 9, "max_tokens": 2},
     "min_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2 ** 70}, "seed"),
])
def test_invalid_params_400(server, body, param):
    e = _err(_post(server, "/v1/chat/completions", body), 400)
    assert e["type"] == "invalid_request_error"
    assert e["param"] is not None and e["param"].split(".")[0] == param


def test_malformed_json_and_bad_prompts_400(server):
    _err(_post(server, "/v1/chat/completions", None, raw=b'{"model": "tiny", "messages": [}'), 400)
    _err(_post(server, "/v1/completions", None, raw=b"\xff\xfe not json"), 400)
    _err(_post(server, "/v1/completions", None, raw=b"[1, 2]"), 400)
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": []}), 400)
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": [5, 10 ** 6]}), 400)
    _err(_post(server, "/v1/completions", {"model": "tiny", "prompt": [-1]}), 400)
    _err(_post(server, "/v1/completions", None, raw=b'{"model": "tiny", "prompt": "a", "stop": "\\ud800"}'), 400)
    _err(_post(server, "/v1/completions", None, raw=b'{"model": "tiny", "prompt": "\\ud800"}'), 400)


def test_unknown_model_404_and_route_404(server, oai):
    with pytest.raises(openai.NotFoundError) as ei:
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert ei.value.code == "model_not_found"
    _err(httpx.get(server.url + "/v1/nope", headers=server.headers), 404)
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")


def test_context_too_long_400(server, oai):
    long_prompt = "word " * 400        # > 64 tokens (--max-model-len 64)
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    assert ei.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=500)
    assert ei.value.code == "context_length_exceeded"
    # streaming requests are validated before the stream starts
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": long_prompt, "stream": True})
    _err(r, 400)


def test_auth_401(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    e = _err(httpx.post(server.url + "/v1/completions", json=body), 401)
    assert e["code"] == "invalid_api_key"
    _err(httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _err(httpx.get(server.url + "/v1/models"), 401)
    bad = openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_overload_429_batch_first(server):
    """capacity 4 + waiting room 8: limits batch 6, standard 8, interactive 12 requests in flight."""
    import asyncio

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as c:
            long = {"model": "tiny", "prompt": "x", "max_tokens": 60, "ignore_eos": True, "priority": "interactive"}
            busy = [asyncio.create_task(c.post("/v1/completions", json=long)) for _ in range(7)]
            for _ in range(200):                 # wait until all 7 are admitted
                await asyncio.sleep(0.02)
                if server.cluster()["admission"]["inflight"]["interactive"] >= 7:
                    break
            short = {"model": "tiny", "prompt": "y", "max_tokens": 2}
            # 7 in flight: batch (limit 6) is refused; standard (limit 8) and interactive (limit 12) are
            # not. Interactive goes after standard: sent together, an interactive admitted first made 8 in
            # flight and standard was refused (a flake, not the rule)
            rb, rstream, rs = await asyncio.gather(
                c.post("/v1/completions", json={**short, "priority": "batch"}),
                c.post("/v1/completions", json={**short, "priority": "batch", "stream": True}),
                c.post("/v1/completions", json={**short, "priority": "standard"}))
            ri = await c.post("/v1/completions", json={**short, "priority": "interactive"})
            done = await asyncio.gather(*busy)
            return rb, rs, ri, rstream, done

    rb, rs, ri, rstream, done = asyncio.run(run())
    e = _err(rb, 429)
    assert e["code"] == "rate_limit_exceeded"
    assert int(rb.headers["Retry-After"]) >= 1
    _err(rstream, 429)
    assert rs.status_code == 200 and ri.status_code == 200
    assert all(r.status_code == 200 for r in done)
    m = httpx.get(server.url + "/metrics").text
    assert 'tandem_requests_total{endpoint="completions",priority="batch",status="429"}' in m


def test_metrics_exposed(server, oai):
    _greedy_completion(oai, "metrics please", max_tokens=4)
    m = httpx.get(server.url + "/metrics").text
    for name in ("tandem_requests_total", "tandem_time_to_first_token_seconds_bucket",
                 "tandem_time_per_output_token_seconds_bucket", "tandem_e2e_request_latency_seconds_bucket",
                 "tandem_kv_cache_usage_ratio{worker=\"w0\"}", "tandem_queue_depth{priority=\"batch\"}",
                 "tandem_prompt_tokens_total", "tandem_generation_tokens_total", "tandem_worker_up"):
        assert name in m, name
    assert 'status="200"' in m and 'priority="interactive"' in m


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=server.headers, timeout=30,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                            "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["prompt_token_ids"]
    assert sum(len(c["choices"][0].get("token_ids", [])) for c in chunks) == 3
