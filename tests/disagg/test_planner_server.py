"""The planner inside a real `tandem serve --prefill 1 --decode 1 --planner` (2 CPU workers, tiny model):

* a workload that swings summarization -> chat -> summarization makes it flip the prefill worker to
  decode (0P2D: both workers decode and prefill locally) and a worker back to prefill (1P1D), in
  place, while every request completes exactly once with the tokens it asked for;
* with --planner-min-gpus/--planner-max-gpus, chat beyond two workers starts a third worker process
  and zero traffic stops one again (drained first);
* a server with the same flags, left without traffic for 60 s meanwhile, makes no flip and shows no
  NaN in /v1/cluster or /metrics.

The idle server runs beside the others, so its 60 s overlap the swing and scaling tests.
"""
import concurrent.futures as cf
import json
import os
import random
import re
import threading
import time

import httpx
import pytest
from openai import OpenAI

from tests.frontend.serverutil import ServerProc

IDLE_S = 60.0                      # the zero-traffic period


def cpu_profile(model_dir, out):
    """A real (CPU) perf profile of the tiny model, measured with the same code as `tandem profile`."""
    from tandem.profile.profiler import ProfilePlan, profile_cpu
    plan = ProfilePlan(prefill_tokens=(16, 64, 256, 1024), ctx_cached=(0, 256), ctx_new_tokens=64,
                       decode_batches=(1, 4, 16, 32), decode_contexts=(64, 256), decode_steps=3,
                       mixed_points=((64, 4, 128),), repeats=2)
    return profile_cpu(model_dir, out, plan, command="tests/disagg/test_planner_server.py", max_num_seqs=64,
                       max_model_len=2048)


def planner_flags(prof):
    return ["--prefill", "1", "--decode", "1", "--planner", "--planner-profile", prof,
            "--slo-ttft-ms", "300", "--slo-tpot-ms", "60", "--planner-tick-s", "0.25", "--planner-window-s", "2",
            "--planner-min-dwell-s", "2", "--planner-cooldown-s", "0.5", "--planner-reverse-cooldown-s", "3",
            "--planner-peak-window-s", "2", "--planner-donor-memory-s", "2",
            "--local-prefill-max-tokens", "32", "--max-num-batched-tokens", "512", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def servers(llama_dir, tmp_path_factory):
    prof = cpu_profile(llama_dir, str(tmp_path_factory.mktemp("prof") / "cpu.json"))
    idle = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", *planner_flags(prof)], workers=2)
    swing = None
    try:
        swing = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", *planner_flags(prof)], workers=2)
        idle.wait_ready()
        idle.ready_at = time.monotonic()
        swing.wait_ready()
        yield idle, swing
    finally:
        if swing is not None:
            swing.stop()
        idle.stop()


def roles(s):
    return tuple(sorted(w["role"] for w in s.cluster()["workers"] if w["alive"]))


def metrics(s) -> dict:
    out = {}
    for line in httpx.get(s.url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(tandem_\w+)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def run_phase(s, seconds, groups, results, tag):
    """Closed-loop clients with the official openai client (no client retries: a retry would hide
    an error or make a duplicate). `groups`: (clients, prompt tokens, output tokens, stream)."""
    stop = time.monotonic() + seconds
    specs = [(f"{tag}{'s' if stream else ''}", isl, osl, stream) for n, isl, osl, stream in groups for _ in range(n)]

    def client(k):
        name, isl, osl, stream = specs[k]
        c = OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=120)
        rng = random.Random(f"{name}-{k}")
        i = 0
        while time.monotonic() < stop:
            tag_id = f"{name}-{k}-{i}"
            prompt = [rng.randrange(10, 250) for _ in range(isl)]
            kw = dict(model="tiny", prompt=prompt, max_tokens=osl, temperature=0, extra_body={"ignore_eos": True})
            try:
                if stream:
                    ids, n_tok, n_choices = set(), None, 1
                    for ch in c.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                        ids.add(ch.id)
                        if ch.usage is not None:
                            n_tok = ch.usage.completion_tokens
                    assert len(ids) == 1, ids
                    rid = ids.pop()
                else:
                    r = c.completions.create(**kw)
                    rid, n_tok, n_choices = r.id, r.usage.completion_tokens, len(r.choices)
                results.append((tag_id, osl, rid, n_tok, n_choices, None))
            except Exception as e:  # noqa: BLE001 - every error is a test failure, reported below
                results.append((tag_id, osl, None, None, 0, repr(e)))
            i += 1
        c.close()

    with cf.ThreadPoolExecutor(len(specs)) as ex:
        list(ex.map(client, range(len(specs))))


def test_swing_flips_roles_and_back_losing_nothing(servers):
    _, s = servers
    assert roles(s) == ("decode", "prefill")
    results: list = []
    seen: list = []
    watching = True

    def watch():
        while watching:
            try:
                seen.append((time.monotonic(), roles(s)))
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    w = threading.Thread(target=watch)
    w.start()
    t0 = time.monotonic()
    try:
        run_phase(s, 6, [(8, 1500, 4, False)], results, "sum1")          # summarization-heavy: prefill-bound
        t_chat = time.monotonic()
        run_phase(s, 14, [(24, 16, 64, False)], results, "chat")         # chat-heavy: decode-bound
        t_sum2 = time.monotonic()
        # summarization again, with streamed chat in flight while a decode worker flips to prefill
        run_phase(s, 12, [(8, 1500, 4, False), (2, 16, 200, True)], results, "sum2")
    finally:
        watching = False
        w.join()
    wall = time.monotonic() - t0
    c = s.cluster()
    pl = c["planner"]
    flips = pl["flips"]
    if os.environ.get("TANDEM_PLANNER_TEST_DUMP"):           # /v1/cluster at the end, for post-mortems
        with open(os.environ["TANDEM_PLANNER_TEST_DUMP"], "w") as f:
            json.dump(c, f)
    why = (flips, wall, [d for d in pl["decisions"] if d["action"] == "flip"][-4:], s.logs()[-2000:])
    # at least one flip each way, seen in the planner, /metrics and the roles themselves
    assert flips["prefill->decode"] >= 1 and flips["decode->prefill"] >= 1, why
    m = metrics(s)
    assert m['tandem_planner_flips_total{direction="prefill->decode"}'] >= 1
    assert m['tandem_planner_flips_total{direction="decode->prefill"}'] >= 1
    assert m['tandem_pool_workers{role="prefill"}'] + m['tandem_pool_workers{role="decode"}'] == 2
    assert any(r == ("decode", "decode") for t, r in seen if t >= t_chat), why
    assert any(r == ("decode", "prefill") for t, r in seen if t >= t_sum2), why
    # every request completed exactly once, with exactly the tokens it asked for, no error
    errors = [r for r in results if r[5] is not None]
    assert not errors, errors[:3]
    tags = [r[0] for r in results]
    ids = [r[2] for r in results]
    assert len(tags) == len(set(tags)) and len(ids) == len(set(ids))
    assert all(r[3] == r[1] and r[4] == 1 for r in results), [r for r in results if r[3] != r[1]][:3]
    assert {t.split("-")[0] for t in tags} == {"sum1", "chat", "sum2", "sum2s"}
    # the server ran each request once: no retry, no dead worker; in-flight work moved with its KV
    tot = c["totals"]
    assert tot["requests_retried"] == 0 and tot["worker_deaths"] == 0, tot
    assert tot["migrations"] >= 1, tot          # decode -> prefill moved in-flight requests with their KV
    finished = sum(v for k, v in m.items() if k.startswith("tandem_request_finish_total"))
    assert finished == len(results), (finished, len(results))
    # every decision says why, with its inputs
    for d in pl["decisions"]:
        assert d["reason"] and (d["action"] == "hold" or d["inputs"])
    assert any(d["to_role"] == "decode" for d in pl["decisions"] if d["action"] == "flip")
    assert pl["completed_flips"], pl
    print(f"swing: {len(results)} requests in {wall:.1f}s, flips {flips}, handoffs {tot['kv_handoffs']}, "
          f"migrations {tot['migrations']}, completed flips {pl['completed_flips']}")
    t_end = time.monotonic()
    print(f"phases: chat at {t_chat - t0:.1f}s, sum2 at {t_sum2 - t0:.1f}s; decisions (s since the swing began):")
    for d in pl["decisions"]:
        print(f"  {d['time'] - t_end + wall:6.1f}s {d['action']} {d.get('from_role')}->{d.get('to_role')}: {d['reason']}")


def test_planner_starts_and_stops_workers(llama_dir, tmp_path):
    """--planner-min-gpus 2 --planner-max-gpus 3: chat beyond two workers starts a third worker
    process; zero traffic afterwards stops one (drained first); nothing is lost."""
    prof = cpu_profile(llama_dir, str(tmp_path / "cpu.json"))
    s = ServerProc(["--model", llama_dir, "--served-model-name", "tiny", *planner_flags(prof),
                    "--planner-min-gpus", "2", "--planner-max-gpus", "3",
                    "--planner-set", "scale_in_delay_s=3", "--planner-set", "start_cooldown_s=2"], workers=2)
    try:
        s.wait_ready()
        results: list = []
        run_phase(s, 12, [(24, 16, 64, False)], results, "chat")
        peak = len(s.cluster()["workers"])
        end = time.monotonic() + 30
        while time.monotonic() < end:
            c = s.cluster()
            if c["totals"]["workers_alive"] == 2 and any(e["event"] == "stopped" for e in c["planner"]["scaling"]):
                break
            time.sleep(0.5)
        events = [(e["event"], e["worker"]) for e in c["planner"]["scaling"]]
        assert peak == 3 and ("start", "w2") in events and ("started", "w2") in events, events
        assert any(e == "stopped" for e, _ in events) and c["totals"]["workers_alive"] == 2, events
        assert c["planner"]["status"]["starts"] >= 1 and c["planner"]["status"]["stops"] >= 1
        assert not [r for r in results if r[5] is not None or r[3] != r[1]]
        assert len({r[2] for r in results}) == len(results)
        assert c["totals"]["worker_deaths"] == 0 and c["totals"]["requests_retried"] == 0
        # the stopped worker is gone, its process too
        stopped = [w for w in c["workers"] if w["state"] == "stopped"]
        assert len(stopped) == 1 and c["runtime"]["workers"][stopped[0]["id"]]["returncode"] is not None
    finally:
        s.stop()


def test_zero_traffic_60s_no_flip_no_nan(servers):
    idle, _ = servers
    while True:
        c = idle.cluster()
        assert sum(c["planner"]["flips"].values()) == 0, c["planner"]["decisions"]
        left = IDLE_S - (time.monotonic() - idle.ready_at)
        if left <= 0:
            break
        time.sleep(min(left, 5.0))
    assert roles(idle) == ("decode", "prefill")
    pl = c["planner"]
    assert pl["ticks"] >= IDLE_S / 0.25 * 0.5             # it kept ticking all along
    assert not pl["errors"]
    text = json.dumps(pl)
    assert "NaN" not in text and "Infinity" not in text
    json.loads(httpx.get(idle.url + "/v1/cluster", timeout=10).text,
               parse_constant=lambda x: pytest.fail(f"{x} in /v1/cluster"))
    m = metrics(idle)
    assert m, "no tandem_* metrics"
    assert all(v == v and abs(v) != float("inf") for v in m.values()), [k for k, v in m.items() if v != v]
    assert m['tandem_planner_flips_total{direction="prefill->decode"}'] == 0



def test_planner_sees_a_first_token_while_the_request_still_streams(servers):
    """The planner's window gets each first token when it is sent, not at the request's finish: a
    chat streaming for longer than the window (2 s here) must show in the measured TTFT while it
    streams. (Reported at the finish, backdated, it fell out of the window: on two 8B workers the
    planner read a TTFT p90 of 0 ms through chat floods whose client-side p90 was 1.5 s.)"""
    _, s = servers
    c = OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=120)
    seen_ttft, n_after, finished_at = None, 0, None
    stream = c.completions.create(model="tiny", prompt=[11, 12, 13, 14], max_tokens=1500, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    t_first = None
    for ch in stream:
        if t_first is None:
            t_first = time.monotonic()
        elif seen_ttft is None:
            # poll between chunks until a tick has read the window (ticks every 0.25 s)
            m = s.cluster()["planner"]["last_inputs"].get("measured", {})
            if time.monotonic() - t_first > 0.6:
                seen_ttft = m.get("ttft_p90_ms", 0.0)
        else:
            n_after += 1
        if ch.choices and ch.choices[0].finish_reason:
            finished_at = time.monotonic()
    c.close()
    assert finished_at is not None
    assert seen_ttft is not None and seen_ttft > 0, seen_ttft
    assert n_after > 0, "the request had finished before the planner's window was read"
