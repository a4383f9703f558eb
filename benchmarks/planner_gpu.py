"""Issue #8 GPU run: the planner flipping 2 workers in place under a bursty mixed workload, vs static 1P1D.

    python3 benchmarks/planner_gpu.py [--out DIR]                 # nvidia-h200-x2, llama-3.1-8b
    python3 benchmarks/planner_gpu.py --smoke --out /tmp/p        # CPU, tiny model, ~40 s

One `tandem bench --workload bursty` request list (fixed seed, saved once) is replayed against
  1. `tandem serve --prefill 1 --decode 1 --planner ...` while /v1/cluster is polled every --poll-s
     (roles, planner decisions, and each worker's own flip record: SetRole time and drain time), and
  2. the same deployment without the planner (static 1P1D).
The bursty schedule swings every half period between a chat flood (on phase: needs two decode workers)
and a summarization-heavy phase (off phase: wants a prefill worker). Per swing: swing → flip decision →
flip completed on the worker (drain done) → seen by the frontend, against the goals (swing → completed
<= 2 s, decision → completed <= 1 s); lost requests (failed or short) of the planner run; goodput of
both runs at the SLO. Clocks: bench's t0, the planner's decisions and the workers' flip records are all
this host's CLOCK_MONOTONIC. Writes DIR/planner.json, DIR/bench_*.json, DIR/serve_*.log.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import threading
import time
from pathlib import Path


def _load_sibling(name: str):
    """benchmarks/NAME.py as module `benchmarks_NAME` (a bare `disagg` would shadow the tests.disagg package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_d = _load_sibling("disagg")
ROOT, Server, bench, ensure_model, fmt, log, save_requests = (
    _d.ROOT, _d.Server, _d.bench, _d.ensure_model, _d.fmt, _d.log, _d.save_requests)


# ============================================================================ analysis (pure)
def swing_times(duration_s: float, period_s: float, duty: float) -> list[tuple[float, str]]:
    """Phase starts of the bursty schedule in [0, duration): (seconds after t0, phase)."""
    out = []
    for k in range(int(math.ceil(duration_s / period_s))):
        for off, phase in ((0.0, "on"), (duty * period_s, "off")):
            t = k * period_s + off
            if t < duration_s:
                out.append((t, phase))
    return out


def analyze(t0: float, swings: list[tuple[float, str]], decisions: list[dict], worker_flips: list[dict],
            role_seen: list[dict], goal_total_s: float = 2.0, goal_flip_s: float = 1.0) -> dict:
    """Line flips up with swings. `decisions`: planner decisions (dicts with time, action, worker_id,
    to_role); `worker_flips`: the workers' flip records (worker, to, at, flip_s, drain_s);
    `role_seen`: first poll at which each worker showed a role ({worker, role, t}). All monotonic."""
    flips = sorted((d for d in decisions if d.get("action") == "flip"), key=lambda d: d["time"])
    rows = []
    for d in flips:
        wf = min((f for f in worker_flips if f["worker"] == d.get("worker_id") and f["to"] == d.get("to_role")
                  and f["at"] >= d["time"] - 0.05), key=lambda f: f["at"], default=None)
        seen = min((r["t"] for r in role_seen if r["worker"] == d.get("worker_id") and r["role"] == d.get("to_role")
                    and r["t"] >= d["time"] - 0.05), default=None)
        prev = [(t0 + s, ph) for s, ph in swings if t0 + s <= d["time"]]
        swing_at, phase = prev[-1] if prev else (None, None)
        done = None
        if wf is not None:
            done = wf["at"] + (wf["drain_s"] if wf.get("drain_s") is not None else wf["flip_s"])
        row = {"worker": d.get("worker_id"), "from": d.get("from_role"), "to": d.get("to_role"),
               "reason": d.get("reason"), "decision_t": round(d["time"] - t0, 3),
               "swing_t": round(swing_at - t0, 3) if swing_at is not None else None, "phase": phase,
               "swing_to_decision_s": round(d["time"] - swing_at, 3) if swing_at is not None else None,
               "setrole_s": wf["flip_s"] if wf else None, "drain_s": wf.get("drain_s") if wf else None,
               "decision_to_done_s": round(done - d["time"], 3) if done is not None else None,
               "swing_to_done_s": round(done - swing_at, 3) if done is not None and swing_at is not None else None,
               "decision_to_seen_s": round(seen - d["time"], 3) if seen is not None else None}
        rows.append(row)
    # the first flip after each swing is the planner's answer to it
    answered = {}
    for r in rows:
        if r["swing_t"] is not None and r["swing_t"] not in answered:
            answered[r["swing_t"]] = r
    firsts = list(answered.values())
    tot = [r["swing_to_done_s"] for r in firsts if r["swing_to_done_s"] is not None]
    fl = [r["decision_to_done_s"] for r in rows if r["decision_to_done_s"] is not None]
    return {"flips": rows, "swings": [{"t": s, "phase": ph, "answered": s in answered} for s, ph in swings],
            "swings_answered": len(firsts), "swing_to_done_max_s": max(tot) if tot else None,
            "decision_to_done_max_s": max(fl) if fl else None,
            "goal_swing_to_done_met": bool(tot) and max(tot) <= goal_total_s,
            "goal_flip_met": bool(fl) and max(fl) <= goal_flip_s}


def lost_requests(rep: dict) -> dict:
    """Failed requests and requests that ended with fewer tokens than asked (ignore_eos is on)."""
    reqs = rep.get("requests") or []
    failed = [r for r in reqs if r.get("status") != "ok"]
    short = [r for r in reqs if r.get("status") == "ok" and (r.get("output_tokens") or 0) < r.get("osl_requested", 0)]
    return {"sent": len(reqs), "failed": len(failed), "short": len(short),
            "errors": sorted({str(r.get("error_kind")) for r in failed})}


# ============================================================================ polling
class ClusterPoller(threading.Thread):
    """Polls /v1/cluster: planner decisions (deduplicated), each worker's flip record, role changes."""

    def __init__(self, url: str, period_s: float):
        super().__init__(daemon=True, name="cluster-poller")
        self.url, self.period_s = url, period_s
        self.stop_evt = threading.Event()
        self.decisions: dict[tuple, dict] = {}
        self.ticks: list[dict] = []
        self.worker_flips: dict[tuple, dict] = {}
        self.role_seen: list[dict] = []
        self._role: dict[str, str] = {}
        self.polls = 0
        self.errors = 0
        self.last: dict | None = None

    def run(self) -> None:
        import httpx
        with httpx.Client(timeout=5) as c:
            while not self.stop_evt.is_set():
                t = time.monotonic()
                try:
                    self.observe(c.get(self.url + "/v1/cluster").json(), t)
                except Exception:  # noqa: BLE001 - a missed poll only coarsens the timeline
                    self.errors += 1
                self.stop_evt.wait(max(0.0, self.period_s - (time.monotonic() - t)))

    def observe(self, c: dict, t: float) -> None:
        self.polls += 1
        self.last = c
        pl = c.get("planner") or {}
        for d in pl.get("decisions") or []:
            self.decisions.setdefault((d.get("time"), d.get("action"), d.get("worker_id")), d)
        if pl.get("last_inputs"):                 # the tick's needs, pressures and regime: why it did (not) flip
            self.ticks.append({"t": t, "regime": pl.get("regime"), "inputs": pl["last_inputs"]})
        for w in c.get("workers") or []:
            if not w.get("alive"):
                continue
            f = (w.get("stats") or {}).get("last_flip")
            if f:
                self.worker_flips[(w["id"], f["at"])] = {"worker": w["id"], **f}     # keeps the latest drain_s
            if self._role.get(w["id"]) != w["role"]:
                self._role[w["id"]] = w["role"]
                self.role_seen.append({"worker": w["id"], "role": w["role"], "t": t})


# ============================================================================ runs
def cpu_profile(model: str, out: Path) -> str:
    """A measured CPU profile of the tiny model (what the planner needs; `tandem profile` is GPU-only)."""
    from tandem.profile.profiler import ProfilePlan, profile_cpu
    plan = ProfilePlan(prefill_tokens=(16, 64, 256, 512), ctx_cached=(0, 128), ctx_new_tokens=32,
                       decode_batches=(1, 4, 8), decode_contexts=(64, 256), decode_steps=2,
                       mixed_points=((64, 4, 128),), repeats=1)
    return profile_cpu(model, str(out), plan, command="benchmarks/planner_gpu.py --smoke", max_num_seqs=16,
                       max_model_len=1024)


def serve_and_bench(a, name: str, pool: list[str], trace: Path, slo: list[str], poll: bool) -> dict:
    srv = Server(a, name, pool)
    poller = None
    try:
        ready_s = srv.wait_ready(a.start_timeout)
        log(f"{name}: ready in {ready_s:.1f}s")
        if poll:
            poller = ClusterPoller(srv.url, a.poll_s)
            poller.start()
        rep = bench(a, srv.url, trace, name, slo=slo)
        out = {"ready_s": ready_s, "report": rep, "cluster": srv.cluster()}
        if poller is not None:
            poller.stop_evt.set()
            poller.join(10)
            out["poll"] = {"polls": poller.polls, "errors": poller.errors,
                           "decisions": sorted(poller.decisions.values(), key=lambda d: d["time"]),
                           "worker_flips": sorted(poller.worker_flips.values(), key=lambda f: f["at"]),
                           "role_seen": poller.role_seen, "ticks": poller.ticks}
        return out
    finally:
        if poller is not None:
            poller.stop_evt.set()
        srv.stop()


def smoke_defaults(a) -> None:
    a.device, a.preset = "cpu", "tiny"
    a.duration, a.period, a.duty, a.poll_s = 10.0, 5.0, 0.5, 0.1
    a.wl = ("rate=2,burst_factor=4,burst_mix=0.95,mix=0.1,chat_isl=24,chat_osl=24,summarize_isl=300,"
            "summarize_osl=4,max_isl=400,max_osl=48")
    a.engine_args = "--max-num-seqs 4 --max-num-batched-tokens 256"
    a.planner_args = ("--planner-tick-s 0.25 --planner-window-s 1 --planner-min-dwell-s 1 --planner-cooldown-s 0.5 "
                      "--planner-reverse-cooldown-s 1 --planner-peak-window-s 1 --planner-donor-memory-s 1 "
                      "--local-prefill-max-tokens 32")
    a.request_timeout, a.start_timeout = 30, 90


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, short run (CI)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/planner"))
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--model", default=None, help="model dir (default: DIR/model_PRESET, made with tandem model init)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default=str(ROOT / "profiles" / "h100_llama-3.1-8b.json"),
                    help="planner perf profile (smoke: measured on the CPU at start)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    ap.add_argument("--period", type=float, default=40.0, help="bursty period: on (chat flood) then off phase")
    ap.add_argument("--duty", type=float, default=0.5, help="fraction of the period in the on phase")
    # on phase: 24 req/s, 95% chat (256 in, 384 out): ~100 concurrent chats, more than one decode worker's
    # 64 slots; off phase: 6 req/s, 90% summarization (3,072 in, 128 out): ~17k prompt tok/s
    ap.add_argument("--wl", default="rate=6,burst_factor=4,burst_mix=0.95,mix=0.1")
    ap.add_argument("--engine-args", default="--max-num-seqs 64 --max-num-batched-tokens 2048")
    ap.add_argument("--planner-args", default="--planner-tick-s 0.25 --planner-window-s 2 --planner-min-dwell-s 4 "
                                              "--planner-reverse-cooldown-s 4 --planner-peak-window-s 4 "
                                              "--planner-donor-memory-s 10")
    ap.add_argument("--slo-ttft-ms", type=float, default=500)
    ap.add_argument("--slo-tpot-ms", type=float, default=50)
    ap.add_argument("--poll-s", type=float, default=0.2)
    ap.add_argument("--share-gpu", action="store_true",
                    help="both workers on GPU 0 (when no 2-GPU machine is lent: flip timings and lost requests are "
                         "real; goodput is that of two workers time-slicing one GPU; pass --kv-cache-memory-gb in "
                         "--engine-args)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", default="planner,static_1p1d",
                    help="deployments to run, in order (e.g. planner alone when device time is short); also "
                         "static_spill and planner_spill: the same with --spill-args")
    ap.add_argument("--spill-args", default="--spill-batch",
                    help="serve flags of the *_spill runs (e.g. add --prefill-chunk-while-decoding 512)")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--start-timeout", type=float, default=240.0)
    a = ap.parse_args(argv)
    if a.smoke:
        smoke_defaults(a)
    a.disagg_args = ""
    t_start = time.monotonic()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    ensure_model(a)
    if a.smoke:
        a.profile = cpu_profile(a.model, Path(a.out) / "cpu_profile.json")
    wl = f"{a.wl},burst_period_s={a.period},burst_duty={a.duty}"
    rows = save_requests(a, "bursty", "bursty", wl, a.seed)
    trace = Path(a.out) / "requests_bursty.jsonl"
    n_chat = sum(1 for r in rows if r.get("class") == "chat")
    log(f"bursty workload: {len(rows)} requests ({n_chat} chat) over {a.duration:.0f}s, --wl {wl}")
    slo = ["--slo-ttft-ms", str(a.slo_ttft_ms), "--slo-tpot-ms", str(a.slo_tpot_ms)]
    res: dict = {"args": vars(a), "requests": len(rows), "chat_requests": n_chat,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    planner_pool = ["--prefill", "1", "--decode", "1", "--planner", "--planner-profile", a.profile,
                    "--slo-ttft-ms", str(a.slo_ttft_ms), "--slo-tpot-ms", str(a.slo_tpot_ms), *a.planner_args.split()]
    # the static run routes as the planner run does (its SLO covers batch TPOT: no batch-on-prefill)
    static_pool = ["--prefill", "1", "--decode", "1", "--batch-on-prefill-max-tokens", "0"]
    runs = {}
    wanted = [r for r in a.runs.split(",") if r]
    spill = a.spill_args.split()
    for name, pool, poll in (("planner", planner_pool, True), ("static_1p1d", static_pool, False),
                             ("static_spill", static_pool + spill, False), ("planner_spill", planner_pool + spill, True)):
        if name not in wanted:
            continue
        try:
            runs[name] = serve_and_bench(a, name, pool, trace, slo, poll)
        except Exception as e:  # noqa: BLE001 - report, and still run the other deployment
            import traceback
            traceback.print_exc()
            runs[name] = {"error": f"{type(e).__name__}: {e}"}
    swings = swing_times(a.duration, a.period, a.duty)
    p = runs.get("planner", {})
    if "report" in p:
        t0 = p["report"]["config"]["t0_monotonic"]
        res["flips"] = analyze(t0, swings, p["poll"]["decisions"], p["poll"]["worker_flips"], p["poll"]["role_seen"])
        res["lost"] = lost_requests(p["report"])
        res["completed_flips"] = (p["cluster"].get("planner") or {}).get("completed_flips")
        res["polls"] = {k: p["poll"][k] for k in ("polls", "errors")}
        res["decisions"] = p["poll"]["decisions"]          # every decision seen, with its inputs and reason
        res["ticks"] = p["poll"]["ticks"]                  # the planner's inputs at each poll
    for name, r in runs.items():
        cfg = (((r.get("cluster") or {}).get("planner") or {}).get("status") or {}).get("config")
        if cfg:
            res[f"planner_config_{name}"] = cfg          # as the server built it (spill mode shows here)
        if "report" in r:
            s = r["report"]["summary"]
            res[f"summary_{name}"] = {k: {m: s[k].get(m) for m in ("requests_completed", "requests_failed", "goodput",
                                                                     "goodput_per_gpu", "slo_attainment", "ttft_ms",
                                                                     "tpot_ms", "request_throughput")}
                                      for k in s}
        else:
            res[f"error_{name}"] = r.get("error")
    gp, gs = (res.get(f"summary_{n}", {}).get("overall", {}).get("goodput_per_gpu") for n in ("planner", "static_1p1d"))
    res["goodput_ratio_planner_vs_static"] = gp / gs if gp is not None and gs else None
    res["wall_s"] = time.monotonic() - t_start
    Path(a.out, "planner.json").write_text(json.dumps(res, indent=1, default=str))
    print_report(res)
    return 0 if runs and all("report" in r for r in runs.values()) else 1


def print_report(res: dict) -> None:
    f = res.get("flips") or {}
    print("\n## Planner on 2 workers, bursty mixed workload (issue #8)")
    print("| swing t (s) | phase | flip | decision after swing (s) | SetRole (ms) | drain (s) | decision → done (s) "
          "| swing → done (s) | decision → seen by frontend (s) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in f.get("flips", []):
        print(f"| {fmt(r['swing_t'])} | {r['phase']} | {r['worker']} {r['from']}→{r['to']} @ {r['decision_t']:.1f}s | "
              f"{fmt(r['swing_to_decision_s'], 2)} | {fmt(r['setrole_s'] * 1e3 if r['setrole_s'] is not None else None, 2)} | "
              f"{fmt(r['drain_s'], 3)} | {fmt(r['decision_to_done_s'], 3)} | {fmt(r['swing_to_done_s'], 2)} | "
              f"{fmt(r['decision_to_seen_s'], 2)} |")
    sw = f.get("swings", [])
    print(f"swings answered by a flip: {f.get('swings_answered', 0)} of {len(sw)}; max swing → done "
          f"{fmt(f.get('swing_to_done_max_s'), 2)} s (goal <= 2: {fmt(f.get('goal_swing_to_done_met'))}); max decision → "
          f"done {fmt(f.get('decision_to_done_max_s'), 3)} s (goal <= 1: {fmt(f.get('goal_flip_met'))})")
    lost = res.get("lost") or {}
    print(f"planner run: {lost.get('sent')} requests, failed {lost.get('failed')}, short {lost.get('short')} "
          f"{lost.get('errors') or ''}")
    print("| run | completed | failed | goodput/GPU (req/s) | SLO attainment | chat TTFT p99 ms | chat TPOT p99 ms "
          "| summarize TTFT p90 ms | summarize TPOT p90 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = [n for n in ("planner", "static_1p1d", "static_spill", "planner_spill")
             if f"summary_{n}" in res or f"error_{n}" in res]
    for name in names:
        s = res.get(f"summary_{name}")
        if not s:
            print(f"| {name} | failed: {res.get(f'error_{name}')} |")
            continue
        o, c, b = s.get("overall", {}), s.get("chat", {}), s.get("summarize", {})
        print(f"| {name} | {o.get('requests_completed')} | {o.get('requests_failed')} | {fmt(o.get('goodput_per_gpu'), 3)} | "
              f"{fmt(o.get('slo_attainment'), 3)} | {fmt((c.get('ttft_ms') or {}).get('p99'))} | "
              f"{fmt((c.get('tpot_ms') or {}).get('p99'))} | {fmt((b.get('ttft_ms') or {}).get('p90'))} | "
              f"{fmt((b.get('tpot_ms') or {}).get('p90'))} |")
    print(f"goodput/GPU planner / static 1P1D = {fmt(res.get('goodput_ratio_planner_vs_static'), 2)}")
    log(f"done in {res.get('wall_s', 0):.0f}s")


if __name__ == "__main__":
    sys.exit(main())
