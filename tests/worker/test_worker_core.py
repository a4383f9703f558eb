"""WorkerCore with the real engine in-process, the wire protocol, and the worker process's failure path."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading

import pytest
import zmq

from tandem import SamplingParams
from tandem.common.hashing import block_hashes
from tandem.worker.protocol import (Abort, Delta, Deltas, Generate, Ready, SetRole, Shutdown, WorkerFailed,
                                    WorkerStatus, decode, encode)

P = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(llama_dir, request):
    """The engine with synchronous steps and with asynchronous scheduling (steps left in flight)."""
    from tandem.engine.config import EngineConfig
    from tandem.engine.engine import Engine
    return Engine(EngineConfig(llama_dir, device="cpu", max_model_len=256, num_kv_blocks=64,
                               async_scheduling=request.param))


@pytest.fixture
def core(engine):
    from tandem.worker.proc import WorkerCore
    sent: list = []
    c = WorkerCore(engine, "w0", "both", send=sent.append)
    c.sent = sent
    yield c
    for rid in list(c.active):
        engine.abort_request(rid)
    engine.drain_kv_events()


def _run(core, limit=200):
    for _ in range(limit):
        if not core.has_work():
            break
        core.step()
    return [d for m in core.sent if isinstance(m, Deltas) for d in m.outputs]


def test_protocol_roundtrip():
    msgs = [Generate("r", [1, 2], P.to_dict(), "batch"), Abort(["a", "b"]), SetRole("prefill"), Shutdown("x"),
            Ready("w", "both", "ipc://x", 1, "m", "cpu", 10, 16, 100, 8, 4096),
            Deltas("w", [Delta("r", [1], "a", True, "stop", 3, 1, 0, [{"token_id": 1, "logprob": -0.5, "top": []}]),
                         Delta.failure("q", "bad", 400, "invalid_request_error", "prompt")]),
            WorkerStatus("w", "both", 3, {"num_waiting": {"batch": 1}}, [2 ** 63 - 1], [5]), WorkerFailed("w", "e")]
    for m in msgs:
        assert decode(encode(m)) == m


def test_generate_matches_llm(core, llama_dir):
    from tandem import LLM
    prompt = list(range(10, 40))
    core.handle(Generate("g1", prompt, P.to_dict()))
    outs = _run(core)
    toks = [t for d in outs for t in d.new_token_ids]
    ref = LLM(llama_dir).generate([prompt], P)[0]
    assert toks == ref.token_ids
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert all(isinstance(m, Deltas) and len(m.outputs) == 1 for m in core.sent)   # one message per step
    # KV events: the prompt's full blocks were stored, with the router's hashes
    st = core.status()
    assert set(block_hashes(prompt, 16)) <= set(st.kv_stored)
    assert st.stats["kv_blocks_used"] == 0 and st.role == "both" and not core.active


def test_bad_requests_become_error_deltas(core, engine):
    core.handle(Generate("too-long", list(range(300)), P.to_dict()))
    core.handle(Generate("bad-param", [1, 2], {**P.to_dict(), "top_p": 7.0}))
    core.handle(Generate("bad-prio", [1, 2], P.to_dict(), priority="vip"))
    core.handle(Generate("bad-field", [1, 2], {"bogus": 1}))
    errs = {d.request_id: d for m in core.sent for d in m.outputs}
    assert errs["too-long"].error_status == 400 and errs["too-long"].error_code == "context_length_exceeded"
    assert errs["bad-param"].error_status == 400 and errs["bad-param"].error_param == "top_p"
    assert errs["bad-prio"].error_status == 400
    assert errs["bad-field"].error_status == 400
    assert all(d.finished and d.finish_reason == "error" for d in errs.values())
    assert not core.active and not engine.has_unfinished_requests()


def test_abort_frees_kv(core, engine):
    core.handle(Generate("a1", list(range(100)), SamplingParams(max_tokens=100, ignore_eos=True).to_dict()))
    core.step()
    core.step()
    assert engine.stats().kv_blocks_used > 0
    core.handle(Abort(["a1", "unknown"]))
    assert engine.stats().kv_blocks_used == 0
    last = core.sent[-1].outputs
    assert [(d.request_id, d.finish_reason) for d in last] == [("a1", "abort")]
    assert not core.has_work()


def test_step_failure_fails_requests_not_worker(core, engine, monkeypatch):
    core.handle(Generate("x1", [1, 2, 3], P.to_dict()))
    core.handle(Generate("x2", [4, 5, 6], P.to_dict()))

    def boom():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine, "step", boom)
    core.step()
    failed = core.sent[-1].outputs
    assert {d.request_id for d in failed} == {"x1", "x2"}
    assert all(d.finish_reason == "error" and d.error_status == 500 for d in failed)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    core.sent.clear()
    core.handle(Generate("x3", [1, 2, 3], P.to_dict()))
    assert _run(core)[-1].finish_reason == "length"
    assert core.status().stats["num_step_errors"] == 1


def test_set_role_is_reported(core):
    core.handle(SetRole("prefill"))
    assert core.status().role == "prefill"
    core.handle(SetRole("sideways"))
    assert core.role == "prefill"
    core.handle(SetRole("both"))
    core.handle(Shutdown())
    assert core.stopping


def test_flip_to_decode_reports_its_drain(core, engine):
    """A prefill worker flipped to decode still finishes its prefills held for export: the status shows
    the flip (from, to, when, how long SetRole took) and, once those prefills are done, the drain time."""
    import time
    core.role = "prefill"
    core.handle(Generate("hp", list(range(10, 60)), SamplingParams(temperature=0, max_tokens=1).to_dict(),
                         hold_kv=True))
    t0 = time.monotonic()
    core.handle(SetRole("decode"))
    f = core.status().stats["last_flip"]
    assert (f["from"], f["to"], f["migrated"]) == ("prefill", "decode", 0)
    assert t0 <= f["at"] <= time.monotonic() and 0 <= f["flip_s"] < 1
    assert f["drain_s"] is None                       # the held-for-export prefill is still queued
    _run(core)
    st = core.status().stats
    assert st["num_flips"] == 1 and 0 < st["last_flip"]["drain_s"] <= time.monotonic() - t0
    engine.release_kv("hp")
    core.handle(SetRole("both"))                      # nothing of the old role left: drained at once
    assert core.status().stats["last_flip"]["drain_s"] is not None


def test_migration_holds_back_a_possible_stop_string_start(engine, llama_dir):
    """A decode worker flipped to prefill hands its requests on: like the engine's own hold-back, the
    last (longest stop - 1) characters stay unsent and Migrated says how many, so the worker that
    continues streams them (and a stop string spanning the move is never shown)."""
    from tandem.transfer.agent import TransferAgent
    from tandem.worker.proc import WorkerCore
    from tandem.worker.protocol import Migrated
    sent: list = []
    agent = TransferAgent(engine, threading.Lock())
    core = WorkerCore(engine, "w0", "decode", send=sent.append, transfer=agent)
    try:
        stop = "@@@@"                                       # never produced: generation runs on
        core.handle(Generate("m", list(range(20, 40)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                                      stop=[stop]).to_dict()))
        for _ in range(8):
            core.step()
        core.handle(SetRole("prefill"))
        streamed = "".join(d.new_text for m in sent if isinstance(m, Deltas) for d in m.outputs)
        mig = [m for m in sent if isinstance(m, Migrated)]
        full = engine.held["m"].text
        assert len(mig) == 1 and full.startswith(streamed) and len(full) > len(stop)
        assert mig[0].unsent_text_chars == len(full) - len(streamed) == len(stop) - 1
        assert decode(encode(mig[0])) == mig[0]
    finally:
        engine.release_kv("m")
        agent.close()


def test_serve_loop_over_zmq(engine):
    from tandem.worker.proc import WorkerCore, serve
    ctx = zmq.Context()
    inp, cmd = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    out, res = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    inp.bind("inproc://cmd")
    cmd.connect("inproc://cmd")
    res.bind("inproc://out")
    out.connect("inproc://out")
    core = WorkerCore(engine, "wz", send=lambda m: out.send(encode(m)))
    t = threading.Thread(target=serve, args=(core, inp, out, 0.05), daemon=True)
    t.start()
    cmd.send(encode(Generate("z", [1, 2, 3, 4], P.to_dict())))
    got, statuses = [], 0
    while not (got and got[-1].finished):
        assert res.poll(10000)
        m = decode(res.recv())
        if isinstance(m, Deltas):
            got += m.outputs
        else:
            statuses += 1
    cmd.send(encode(Shutdown()))
    t.join(5)
    assert not t.is_alive()
    assert sum(len(d.new_token_ids) for d in got) == 8
    for s in (inp, cmd, out, res):
        s.close(0)
    ctx.term()


def test_worker_process_reports_startup_failure():
    d = tempfile.mkdtemp(prefix="tandem-test-")
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{d}/out")
    p = subprocess.run([sys.executable, "-m", "tandem.worker.proc", "--worker-id", "bad", "--model", d + "/missing",
                        "--in-addr", f"ipc://{d}/in", "--out-addr", f"ipc://{d}/out",
                        "--engine-config", json.dumps({"device": "cpu"}), "--log-level", "CRITICAL"],
                       timeout=120, capture_output=True)
    assert p.returncode == 1
    assert pull.poll(5000)
    m = decode(pull.recv())
    assert isinstance(m, WorkerFailed) and m.worker_id == "bad" and "engine failed to start" in m.error
    pull.close(0)
    ctx.term()
