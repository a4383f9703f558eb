"""`tandem sim --shards K`: independent router domains in parallel processes, merged into one report."""
import numpy as np
import pytest

from tandem.sim.cli import main
from tandem.sim.run import SimInputError
from tandem.sim.shards import assign, merge_columns, merge_timelines, split_roles
from tandem.sim.stream import RecordColumns, ReplicatedRequests
from tests.sim.util import random_reqs, run, stable
from tests.sim.util import reqs as make_reqs


def _summary_counts(rep):
    o = rep["summary"]["overall"]
    return o["requests_total"], o["requests_completed"], o["requests_failed"], o["output_tokens"], o["input_tokens"]


def test_result_does_not_depend_on_jobs(profile_dict):
    """Same seed and K: the same report whether the domains run in this process or in 3 forked ones."""
    reqs = ReplicatedRequests(random_reqs(120, seed=4, rate=60.0, shared=True), 3, seed=2)
    one, c = run(profile_dict, reqs, "--gpus", "6", "--shards", "3", "--jobs", "1", "--token-times", "all")
    many, _ = run(profile_dict, reqs, "--gpus", "6", "--shards", "3", "--jobs", "3", "--token-times", "all")
    assert c is None                                      # the domains' clusters stay in their runs
    assert stable(one) == stable(many)
    sh = one["config"]["sim"]["shards"]
    assert sh["domains"] == 3 and sh["split"] == "prefix"
    assert sum(d["requests"] for d in sh["per_domain"]) == len(reqs) == one["summary"]["overall"]["requests_total"]
    assert [d["workers"] for d in sh["per_domain"]] == [2, 2, 2]


def test_every_request_is_served_once(profile_dict):
    """The merge counts each request once: totals equal the one-router run's, token for token."""
    reqs = random_reqs(500, seed=7, rate=150.0)
    whole, _ = run(profile_dict, reqs, "--gpus", "8", "--records", "none")
    split, _ = run(profile_dict, reqs, "--gpus", "8", "--shards", "4", "--jobs", "2")
    assert _summary_counts(split) == _summary_counts(whole)
    assert split["summary"]["overall"]["output_tokens"] == sum(r.osl for r in reqs)    # ignore_eos
    for cls in ("chat", "batch"):
        assert split["summary"][cls]["requests_total"] == whole["summary"][cls]["requests_total"]
    assert split["config"]["sim"]["kv_leaks"] == {}
    assert split["requests"] == []                        # columns only, as --records none
    tl = split["timeline"]
    assert tl[-1]["completed"] == 500 and all(e["num_gpus"] == 8.0 for e in tl)


def test_sharded_latency_close_to_one_router(profile_dict):
    """Two domains of 6 workers against one router over 12, at a load the router balances well:
    the typical request sees the same service (the tails may differ: the split is random)."""
    reqs = random_reqs(1500, seed=11, rate=300.0, osl=(20, 200))
    whole, _ = run(profile_dict, reqs, "--gpus", "12", "--records", "none")
    split, _ = run(profile_dict, reqs, "--gpus", "12", "--shards", "2", "--jobs", "2")
    w, s = whole["summary"]["overall"], split["summary"]["overall"]
    assert s["tpot_ms"]["p50"] == pytest.approx(w["tpot_ms"]["p50"], rel=0.10)
    assert s["ttft_ms"]["p50"] == pytest.approx(w["ttft_ms"]["p50"], rel=0.25)
    assert s["output_throughput"] == pytest.approx(w["output_throughput"], rel=0.05)


def test_planner_per_domain(profile_dict):
    """Each domain runs its own planner over its 1P1D; a summarization -> chat swing makes both flip."""
    import random
    rng = random.Random(5)
    specs = [(i * 0.05, rng.randint(3000, 4000), rng.randint(2, 8), "batch") for i in range(120)]
    specs += [(6.0 + i * 0.01, rng.randint(50, 200), rng.randint(150, 250)) for i in range(900)]
    reqs = make_reqs(specs)
    rep, _ = run(profile_dict, reqs, "--prefill", "2", "--decode", "2", "--shards", "2", "--jobs", "1",
                 "--planner", "--slo-ttft-ms", "500", "--slo-tpot-ms", "60", "--planner-tick", "0.5")
    sh = rep["config"]["sim"]["shards"]
    assert [d["roles"] for d in sh["per_domain"]] == [{"prefill": 1, "decode": 1}] * 2
    assert rep["summary"]["overall"]["requests_completed"] == len(reqs)
    ds = rep["config"]["sim"]["planner_decisions"]
    assert ds and all(d["domain"] in (0, 1) for d in ds)
    assert [d["time"] for d in ds] == sorted(d["time"] for d in ds)      # one timeline of decisions
    assert {d["domain"] for d in ds if d["action"] == "flip"} == {0, 1}


def test_split_roles_and_errors():
    # each role dealt on from where the last one stopped: per-role and total counts differ by <= 1
    assert split_roles(["prefill"] * 3 + ["decode"] * 5, 2) == [["prefill", "prefill", "decode", "decode"],
                                                                 ["prefill", "decode", "decode", "decode"]]
    with pytest.raises(ValueError, match="more than the 2 workers"):
        split_roles(["both", "both"], 3)
    with pytest.raises(ValueError, match="cannot serve a request alone"):
        split_roles(["prefill", "decode"], 2)


@pytest.mark.parametrize("flags,msg", [
    (["--gpus", "2", "--shards", "3"], "more than the 2 workers"),
    (["--prefill", "1", "--decode", "1", "--shards", "2"], "cannot serve a request alone"),
    (["--gpus", "4", "--shards", "2", "--max-concurrency", "8"], "max-concurrency"),
])
def test_bad_sharding_is_bad_input(profile_dict, flags, msg):
    with pytest.raises(SimInputError, match=msg):
        run(profile_dict, random_reqs(20, seed=1), *flags)


def test_cli_bad_sharding_exit_code(tmp_path, capsys):
    rc = main(["--workload", "chat", "--duration", "2", "--profile", "synthetic:1b", "--gpus", "2",
               "--shards", "4", "--out", str(tmp_path / "x.json"), "--quiet"])
    assert rc == 2 and "more than the 2 workers" in capsys.readouterr().err


def test_assign_keeps_shared_prefixes_together():
    base = random_reqs(200, seed=3, shared=True)
    reqs = ReplicatedRequests(base, 4, seed=1)
    dom = assign(reqs, 5, seed=0)
    seen = {}
    for r, d in zip(reqs, dom.tolist()):
        key = (r.namespace, r.hash_ids[0])
        assert seen.setdefault(key, d) == d
    assert len(set(dom.tolist())) > 1
    plain = assign(random_reqs(4000, seed=3), 4, seed=0)        # no prefixes: uniform
    assert np.all(np.abs(np.bincount(plain, minlength=4) - 1000) < 120)


def test_merge_columns_renumbers_classes():
    a, b = RecordColumns(), RecordColumns()
    reqs = random_reqs(4, seed=1, priorities=("interactive", "batch"))
    chat = [r for r in reqs if r.cls == "chat"] or reqs[:1]
    batch = [r for r in reqs if r.cls == "batch"] or reqs[1:2]
    a.add(chat[0], 0.0, True, chat[0].arrival_s + 0.1, chat[0].arrival_s + 0.5, 3, 0, None)
    b.add(batch[0], 0.0, True, batch[0].arrival_s + 0.2, batch[0].arrival_s + 0.9, 3, 0, None)
    b.add(chat[0], 0.0, False, None, chat[0].arrival_s + 0.3, 0, None, None, error_kind="x")
    m = merge_columns([a, b])
    names = {v: k for k, v in m.classes.items()}
    assert len(m) == 3 and [names[c] for c in m.cls] == [chat[0].cls, batch[0].cls, chat[0].cls]
    assert m.errors == {chat[0].idx: "x"}


def test_merge_timelines_step_functions():
    d0 = [{"t_s": 0.0, "sent": 1, "completed": 0, "num_gpus": 2.0, "num_workers": 2, "pools": {"both": 2},
           "busy_frac": None, "kv_usage": 0.5},
          {"t_s": 1.0, "sent": 3, "completed": 2, "num_gpus": 2.0, "num_workers": 2, "pools": {"both": 2},
           "busy_frac": 1.0, "kv_usage": 0.1}]
    d1 = [{"t_s": 0.0, "sent": 2, "completed": 0, "num_gpus": 1.0, "num_workers": 1, "pools": {"prefill": 1},
           "busy_frac": None, "kv_usage": 0.2},
          {"t_s": 0.5, "sent": 4, "completed": 4, "num_gpus": 1.0, "num_workers": 1, "pools": {"prefill": 1},
           "busy_frac": 0.4, "kv_usage": 0.8}]
    m = merge_timelines([d0, d1])
    assert [e["t_s"] for e in m] == [0.0, 0.5, 1.0]
    assert [e["sent"] for e in m] == [3, 5, 7]               # a finished domain holds its last sample
    assert m[0]["pools"] == {"both": 2, "prefill": 1} and m[0]["num_gpus"] == 3.0
    assert m[0]["busy_frac"] is None and m[1]["busy_frac"] == 0.4
    assert m[2]["busy_frac"] == pytest.approx((1.0 * 2 + 0.4) / 3, abs=1e-4)
    assert m[0]["kv_usage"] == pytest.approx((0.5 * 2 + 0.2) / 3, abs=1e-4)


def test_progress_over_domains():
    from tandem.sim.shards import Progress
    board = [10.0, 100, 0.0, 0, 30.0, 250]          # (virtual s, requests ended) per domain; one not started
    p = Progress(board, 3)
    assert p.now == pytest.approx(40.0 / 3) and p.completed == 350 and p.sent == 350 and p.failed == 0
