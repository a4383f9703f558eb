"""The planner study: planner vs the best static split vs the Dynamo-like baseline, in `tandem sim`.

    python -m tandem.planner.study run --gpus 8 --workloads conv,code,bursty --jobs 2 \\
        --out study/8.json
    python -m tandem.planner.study report study/*.json --img docs/img --md study/tables.md

Each run is one `tandem sim` simulation (same code path as the CLI: `tandem.sim.run.plan` and
`simulate`), summarised to a few numbers (SLO attainment, goodput, goodput per GPU, GPU-hours,
flips, wall time). The static split is swept (coarse, then refined around the best), the planner
and the baseline start from the best static split, so they are compared on equal footing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import Any, Optional

TRACES = os.environ.get("TANDEM_TRACES", os.path.join(os.path.dirname(__file__), "..", "..", "..",
                                                      "shared", "traces"))
CONV = "azure2023_conv_181546-184500.csv"
CODE = "azure2023_code_181703-184500.csv"

SLO_TTFT_MS = 1000.0
SLO_TPOT_MS = 50.0
# the measured H100 llama-3.1-8b profile (worker_start_s 20.2 s measured); its role_flip_s is null
# (not measured), so the study assumes ROLE_FLIP_S for an in-place flip (no weight reload: stop
# admitting, drain or migrate, switch role) and NVLink bandwidth (measured on H200 x2, DESIGN.md)
# for prefill -> decode KV transfers instead of the profile's on-device copy rate
# the study in docs/planner.md ran on the profile measured before async scheduling and the one-row GEMV
# (archived, so the study re-runs as documented); profiles/h100_llama-3.1-8b.json is the current engine's
PROFILE = os.path.join(os.path.dirname(__file__), "..", "..", "profiles", "archive", "h100_llama-3.1-8b_2026-11-23_sync.json")
ROLE_FLIP_S = 1.0
TRANSFER_GBPS = 394.0

# Load of each workload for a cluster of G GPUs: how many copies of the trace (replicate, with
# random circular shifts), or the synthetic workload's rate, per GPU. Chosen so that the best
# static split is loaded but can meet the SLOs most of the time (see docs/planner.md).
WORKLOADS: dict[str, dict] = {
    # the second half of the conversation trace: its rate swells from ~280 to ~480 req/min
    "conv": {"trace": CONV, "copies_per_gpu": 2.5, "trace_start": 900},
    "code": {"trace": CODE, "copies_per_gpu": 3.0},
    "bursty": {"workload": "bursty", "rate_per_gpu": 3.0, "wl": []},
    # the same generator with the mix swinging between all-summarization and all-chat at a
    # constant rate, 120 s each (the "summarization-heavy to chat-heavy" swing)
    "bursty-swing": {"workload": "bursty", "rate_per_gpu": 4.0,
                     "wl": ["burst_period_s=240,burst_duty=0.5,burst_factor=1,burst_mix=0.0",
                            "mix=1.0,chat_osl=1024"]},
}


def sim_argv(spec: dict) -> list[str]:
    """`tandem sim` flags for one run spec."""
    w = WORKLOADS[spec["workload"]]
    G, P = int(spec["gpus"]), int(spec["prefill"])
    a: list[str] = []
    if "trace" in w:
        R = max(1, int(round(w["copies_per_gpu"] * G * spec.get("load", 1.0))))
        a += ["--trace", os.path.join(spec.get("traces", TRACES), w["trace"]), "--replicate", str(R),
              "--time-scale", str(spec.get("time_scale", 1.0))]
        start = spec.get("trace_start", w.get("trace_start"))
        if start:
            a += ["--trace-start", str(start)]
    else:
        a += ["--workload", w["workload"], "--rate", str(w["rate_per_gpu"] * G * spec.get("load", 1.0))]
        for kv in w.get("wl", []):
            a += ["--wl", kv]
    a += ["--duration", str(spec["duration"]), "--seed", str(spec.get("seed", 0)),
          "--profile", spec.get("profile") or PROFILE,
          "--prefill", str(P), "--decode", str(G - P),
          "--slo-ttft-ms", str(spec.get("slo_ttft_ms", SLO_TTFT_MS)),
          "--slo-tpot-ms", str(spec.get("slo_tpot_ms", SLO_TPOT_MS)),
          "--records", "none", "--token-times", "none", "--no-progress", "--quiet",
          "--out", os.devnull]
    # the flip-time and bandwidth assumptions belong to the measured profile; another profile
    # (e.g. synthetic:8b in tests) keeps its own values unless the spec sets them
    measured = not spec.get("profile")
    for key, flag, dflt in (("role_flip_s", "--role-flip-s", ROLE_FLIP_S),
                            ("transfer_gbps", "--transfer-gbps", TRANSFER_GBPS)):
        v = spec.get(key, dflt if measured else None)
        if v is not None:
            a += [flag, str(v)]
    if spec.get("block_size"):
        a += ["--block-size", str(spec["block_size"])]
    if spec.get("shards"):     # independent router + planner domains (tandem.sim.shards)
        a += ["--shards", str(spec["shards"]), "--jobs", "1"]
    # the study (sessions 2-5) ran before the sim took `tandem serve`'s routing and planner defaults:
    # every prompt prefilled remotely, one prefill worker always kept. Pinned so its numbers reproduce
    a += ["--local-prefill-tokens", str(spec.get("local_prefill_tokens", 0)),
          "--prefill-queue-factor", str(spec.get("prefill_queue_factor", 0))]
    if spec.get("spill_batch"):     # session 9: batch prompts spill to decode workers at a long prefill queue
        a += ["--spill-batch"]
    if spec.get("prefill_chunk"):
        a += ["--prefill-chunk-while-decoding", str(spec["prefill_chunk"])]
    pol = spec["policy"]
    if pol in ("planner", "planner-scale"):
        a += ["--planner", "tandem", "--planner-arg", f"min_prefill={spec.get('min_prefill', 1)}"]
        for kv in spec.get("planner_args", []):
            a += ["--planner-arg", kv]
        if pol == "planner-scale":
            a += ["--min-gpus", str(spec.get("min_gpus", 2)), "--max-gpus", str(G)]
    elif pol == "dynamo":
        a += ["--planner", "dynamo", "--max-gpus", str(G)]
        for kv in spec.get("planner_args", []):
            a += ["--planner-arg", kv]
    return a


def run_one(spec: dict) -> dict:
    """Simulate one spec; returns the spec with its results (never raises)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = dict(spec)
    try:
        from tandem.sim.cli import build_parser
        from tandem.sim.profile import SimProfile
        from tandem.sim.run import plan, simulate
        args = build_parser().parse_args(sim_argv(spec))
        args.profile = SimProfile.load(args.profile)
        reqs, info = plan(args)
        report, cluster = simulate(args, reqs, info)
        o = report["summary"]["overall"]
        sim = report["config"]["sim"]
        decisions = sim.get("planner_decisions") or []
        # (t, prefill, decode, GPUs, requests sent, output tokens): pools and load over time
        pools = [(t.get("t_s"), (t.get("pools") or {}).get("prefill", 0),
                  (t.get("pools") or {}).get("decode", 0), t.get("num_gpus"), t.get("sent", 0),
                  t.get("output_tokens", 0))
                 for t in report.get("timeline", [])]
        out.update({
            "ok": True,
            "requests": o.get("requests_total"), "completed": o.get("requests_completed"),
            "failed": o.get("requests_failed"), "duration_s": o.get("duration_s"),
            "slo_attainment": o.get("slo_attainment"), "goodput": o.get("goodput"),
            "goodput_per_gpu": o.get("goodput_per_gpu"), "gpu_hours": o.get("gpu_hours"),
            "ttft_p90_ms": (o.get("ttft_ms") or {}).get("p90"),
            "tpot_p90_ms": (o.get("tpot_ms") or {}).get("p90"),
            "classes": {k: {"slo_attainment": v.get("slo_attainment"),
                            "ttft_p90_ms": (v.get("ttft_ms") or {}).get("p90"),
                            "tpot_p90_ms": (v.get("tpot_ms") or {}).get("p90"),
                            "completed": v.get("requests_completed")}
                        for k, v in report["summary"].items() if k not in ("overall", "overall (class)")},
            "flips": sum(1 for d in decisions if d.get("action") == "flip"),
            "starts": sum(1 for d in decisions if d.get("action") == "start"),
            "stops": sum(1 for d in decisions if d.get("action") == "stop"),
            "timeline": pools[::max(1, len(pools) // 400)],
            "decisions": [{k: d.get(k) for k in ("time", "action", "worker_id", "from_role",
                                                  "to_role", "reason")}
                          for d in decisions if d.get("action") != "hold"][:400],
            "virtual_s": sim.get("virtual_s"), "sim_wall_s": report["config"].get("wall_s"),
            "kv_leaks": sim.get("kv_leaks"),
            "disagg_decisions": sim.get("disagg_decisions") or {},
        })
    except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
        import traceback
        out.update({"ok": False, "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-2000:]})
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["cpu_s"] = round(time.process_time() - c0, 2)
    return out


def run_many(specs: list[dict], jobs: int, log=sys.stderr, timeout_s: Optional[float] = None,
             work_dir: Optional[str] = None) -> list[dict]:
    """Run specs in `jobs` subprocesses; a run past `timeout_s` of CPU time (RLIMIT_CPU, so a
    busy shared machine does not kill runs that merely wait for a core) is stopped and reported as
    ``timed_out`` (in this study only splits that leave one pool far too small run that long:
    their queues grow without bound and every step scans them)."""
    import subprocess
    import tempfile
    work = work_dir or tempfile.mkdtemp(prefix="tandem-study-")
    os.makedirs(work, exist_ok=True)
    todo = list(enumerate(specs))
    running: list = []
    res: list[dict] = []
    while todo or running:
        while todo and len(running) < max(1, jobs):
            i, s = todo.pop(0)
            path = os.path.join(work, f"run{i}_{os.getpid()}.json")
            code = ("import json,sys; from tandem.planner.study import run_one; "
                    "json.dump(run_one(json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
            p = subprocess.Popen([sys.executable, "-c", code, json.dumps(s), path],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 preexec_fn=_cpu_limit(timeout_s))
            running.append((p, s, path, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            p, s, path, t0 = item
            if p.poll() is None:
                continue
            running.remove(item)
            if os.path.exists(path):
                with open(path) as f:
                    r = json.load(f)
                os.remove(path)
            else:
                err = (p.stderr.read().decode(errors="replace")[-1500:] if p.stderr else "")
                timed = timeout_s is not None and p.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
                r = {**s, "ok": False, "timed_out": timed,
                     "error": f"stopped after {timeout_s:.0f} s of CPU" if timed else f"crashed: {err}",
                     "wall_s": round(time.perf_counter() - t0, 1)}
            if p.stderr:
                p.stderr.close()
            _log(r, log)
            res.append(r)
    return res


def _cpu_limit(timeout_s: Optional[float]):
    if timeout_s is None:
        return None
    t = max(1, int(timeout_s))

    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (t, t + 10))
    return limit


def _log(r: dict, log) -> None:
    if r.get("ok"):
        print(f"  {r['workload']:>12} G={r['gpus']:<4} {r['policy']:<14} P={r['prefill']:<4} "
              f"att={r['slo_attainment']:.3f} gp/gpu={r['goodput_per_gpu'] or 0:.3f} "
              f"gpuh={r['gpu_hours']:.3f} flips={r['flips']} starts={r['starts']} "
              f"stops={r['stops']} failed={r['failed']} cpu={r.get('cpu_s')}s wall={r['wall_s']}s",
              file=log, flush=True)
    else:
        print(f"  FAILED {r.get('workload')} {r.get('policy')} P={r.get('prefill')}: {r.get('error')}",
              file=log, flush=True)


def _score(r: dict) -> tuple:
    return (r.get("goodput_per_gpu") or 0.0, r.get("slo_attainment") or 0.0)


def sweep_static(base: dict, jobs: int, cand: list[int], refine: bool = True,
                 timeout_s: Optional[float] = None) -> list[dict]:
    """Static splits: the given prefill counts, then the untried neighbours of the best."""
    G = base["gpus"]
    cand = sorted({max(1, min(G - 1, p)) for p in cand})
    res = run_many([{**base, "policy": "static", "prefill": p} for p in cand], jobs,
                   timeout_s=timeout_s)
    ok = [r for r in res if r.get("ok")]
    if refine and ok:
        best = max(ok, key=_score)["prefill"]
        step = 1 if G <= 16 else max(1, round(0.05 * G))
        more = sorted({max(1, min(G - 1, best + d)) for d in (-step, step)} - set(cand))
        if more:
            res += run_many([{**base, "policy": "static", "prefill": p} for p in more], jobs,
                            timeout_s=timeout_s)
    return res


def default_candidates(G: int) -> list[int]:
    if G <= 8:
        return list(range(1, G))
    return [round(f * G) for f in (0.2, 0.35, 0.5, 0.65, 0.8)]


def study(G: int, workloads: list[str], jobs: int, durations: dict, policies: list[str],
          extra: Optional[dict] = None, cands: Optional[dict] = None,
          timeout_s: Optional[float] = None, save=None) -> list[dict]:
    out: list[dict] = []
    for wl in workloads:
        base = {"workload": wl, "gpus": G, "duration": durations[wl], **(extra or {})}
        if G >= 16:
            base.setdefault("min_gpus", max(2, G // 4))
        else:
            base.setdefault("min_gpus", 2)
        print(f"[{wl} @ {G} GPUs] static sweep", file=sys.stderr, flush=True)
        st = sweep_static(base, jobs, (cands or {}).get(wl) or default_candidates(G),
                          refine=not base.get("no_refine"), timeout_s=timeout_s)
        out += st
        if save:
            save(out)
        best = max((r for r in st if r.get("ok")), key=_score, default=None)
        p0 = best["prefill"] if best else G // 2
        print(f"[{wl} @ {G} GPUs] best static P={p0}; dynamic policies", file=sys.stderr, flush=True)
        specs = [{**base, "policy": pol, "prefill": p0} for pol in policies]
        out += run_many(specs, jobs, timeout_s=(2 * timeout_s) if timeout_s else None)
        if save:
            save(out)
    return out


# ------------------------------------------------------------------------------------ reporting

def label(r: dict) -> str:
    ld = r.get("load", 1.0)
    return r["workload"] if ld == 1.0 else f"{r['workload']} x{ld:g}"


def dedupe(results: list[dict]) -> list[dict]:
    """One result per (workload, load, GPUs, policy, prefill): a later file wins (re-runs)."""
    seen: dict = {}
    for r in results:
        key = (label(r), r["gpus"], r["policy"], r["prefill"] if r["policy"] == "static" else None)
        if r.get("ok") or key not in seen:
            seen[key] = r
    return list(seen.values())


def best_static(rs: list[dict]) -> Optional[dict]:
    st = [r for r in rs if r.get("ok") and r["policy"] == "static"]
    return max(st, key=_score) if st else None


def _wl_order(name: str) -> tuple:
    base = name.split(" ")[0]
    return (list(WORKLOADS).index(base) if base in WORKLOADS else 99, name)


def _cpu_wall(r: dict) -> str:
    cpu = r.get("cpu_s")
    return (f"{cpu:.0f} ({r.get('wall_s', 0):.0f})" if cpu is not None else
            f"- ({r.get('wall_s', 0):.0f})")


def table(results: list[dict]) -> str:
    rows = ["| workload | GPUs | policy | prefill:decode (start) | SLO attainment | goodput req/s | "
            "goodput/GPU | GPU-hours | vs best static: goodput/GPU, GPU-hours | flips | starts/stops | failed | "
            "CPU s (wall s) |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keyf = lambda r: (label(r), r["gpus"])  # noqa: E731
    groups: dict = {}
    for r in results:
        if r.get("ok") or r["policy"] != "static":
            groups.setdefault(keyf(r), []).append(r)
    order = {"static": 0, "planner": 1, "planner-scale": 2, "dynamo": 3}
    for k in sorted(groups, key=lambda k: (k[1], _wl_order(k[0]))):
        rs = groups[k]
        bs = best_static(rs)
        shown = [bs] if bs else []
        shown += sorted((r for r in rs if r["policy"] != "static"), key=lambda r: order.get(r["policy"], 9))
        for r in shown:
            name = "best static" if r is bs else r["policy"]
            if not r.get("ok"):
                rows.append(f"| {label(r)} | {r['gpus']} | {name} | {r['prefill']}:{r['gpus'] - r['prefill']} | "
                            f"did not finish: {str(r.get('error', '?'))[:50]} | | | | | | | | {_cpu_wall(r)} |")
                continue
            rel = (r["goodput_per_gpu"] / bs["goodput_per_gpu"]) if bs and bs["goodput_per_gpu"] else math.nan
            rel_h = (r["gpu_hours"] / bs["gpu_hours"]) if bs and bs["gpu_hours"] else math.nan
            rows.append(
                f"| {label(r)} | {r['gpus']} | {name} | {r['prefill']}:{r['gpus'] - r['prefill']} | "
                f"{100 * r['slo_attainment']:.1f}% | {r['goodput']:.2f} | {r['goodput_per_gpu']:.3f} | "
                f"{r['gpu_hours']:.2f} | {rel:.2f}x, {rel_h:.2f}x | {r['flips']} | {r['starts']}/{r['stops']} | "
                f"{r['failed']} | {_cpu_wall(r)} |")
    return "\n".join(rows)


def sweep_table(results: list[dict]) -> str:
    rows = ["| workload | GPUs | prefill:decode | SLO attainment | goodput/GPU | TTFT p90 ms | TPOT p90 ms |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in results if r["policy"] == "static"),
                    key=lambda r: (r["gpus"], _wl_order(label(r)), r["prefill"])):
        if not r.get("ok"):
            rows.append(f"| {label(r)} | {r['gpus']} | {r['prefill']}:{r['gpus'] - r['prefill']} | "
                        f"did not finish ({r.get('error', '?')[:60]}) | - | - | - |")
            continue
        rows.append(f"| {label(r)} | {r['gpus']} | {r['prefill']}:{r['gpus'] - r['prefill']} | "
                    f"{100 * r['slo_attainment']:.1f}% | {r['goodput_per_gpu']:.3f} | "
                    f"{r['ttft_p90_ms'] or 0:.0f} | {r['tpot_p90_ms'] or 0:.1f} |")
    return "\n".join(rows)


def plots(results: list[dict], img_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(img_dir, exist_ok=True)
    paths = []
    groups: dict = {}
    for r in results:
        if r.get("ok"):
            groups.setdefault((label(r), r["gpus"]), []).append(r)
    # 1. bars: attainment and goodput/GPU per policy, per (workload, G)
    keys = sorted(groups, key=lambda k: (k[1], _wl_order(k[0])))
    pols = ["best static", "planner", "planner-scale", "dynamo"]
    colors = {"best static": "#888888", "planner": "#1f77b4", "planner-scale": "#2ca02c", "dynamo": "#d62728"}
    if keys:
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(keys)), 7), sharex=True)
        width = 0.8 / len(pols)
        for i, pol in enumerate(pols):
            att, gpg = [], []
            for k in keys:
                rs = groups[k]
                r = best_static(rs) if pol == "best static" else next((x for x in rs if x["policy"] == pol), None)
                att.append(100 * r["slo_attainment"] if r else 0)
                gpg.append(r["goodput_per_gpu"] if r else 0)
            xs = [j + (i - len(pols) / 2 + 0.5) * width for j in range(len(keys))]
            axes[0].bar(xs, att, width, label=pol, color=colors[pol])
            axes[1].bar(xs, gpg, width, label=pol, color=colors[pol])
        axes[0].axhline(95, color="k", lw=0.8, ls="--")
        axes[0].set_ylabel("SLO attainment %")
        axes[0].set_ylim(0, 105)
        axes[1].set_ylabel("goodput req/s per GPU")
        axes[1].set_xticks(range(len(keys)))
        axes[1].set_xticklabels([f"{w}\n{g} GPUs" for w, g in keys])
        axes[0].legend(ncol=4, fontsize=8, loc="lower right")
        fig.suptitle(f"Planner vs best static split vs Dynamo-like baseline "
                     f"(SLO TTFT {SLO_TTFT_MS:.0f} ms, TPOT {SLO_TPOT_MS:.0f} ms)")
        fig.tight_layout()
        p = os.path.join(img_dir, "planner_study_bars.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    # 2. timelines: pool sizes over time per policy, per (workload, G), with the load (arrivals
    # and output tokens per second, from the best static run: the same requests) on a second axis
    for k in keys:
        rs = groups[k]
        bs = best_static(rs)
        fig, ax = plt.subplots(figsize=(9, 3.4))
        for pol in ("planner", "planner-scale", "dynamo"):
            r = next((x for x in rs if x["policy"] == pol), None)
            if not r or not r.get("timeline"):
                continue
            ts = [x[0] for x in r["timeline"]]
            ax.step(ts, [x[1] for x in r["timeline"]], where="post", color=colors[pol],
                    label=f"{pol}: prefill")
            ax.step(ts, [x[1] + x[2] for x in r["timeline"]], where="post", color=colors[pol], ls=":",
                    alpha=0.8, label=f"{pol}: total")
        if bs:
            ax.axhline(bs["prefill"], color="#888888", ls="--", label=f"best static prefill ({bs['prefill']})")
            load = _load_series(bs.get("timeline") or [])
            if load:
                ax2 = ax.twinx()
                ax2.plot([x[0] for x in load], [x[1] for x in load], color="k", lw=0.7, alpha=0.45,
                         label="arrivals req/s")
                ax2.plot([x[0] for x in load], [x[2] / 100 for x in load], color="#9467bd", lw=0.7,
                         alpha=0.45, label="output tok/s / 100")
                ax2.set_ylabel("load")
                ax2.set_ylim(bottom=0)
                ax.set_zorder(ax2.get_zorder() + 1)   # pool lines over the load
                ax.patch.set_visible(False)
                h2, l2 = ax2.get_legend_handles_labels()
            else:
                h2, l2 = [], []
        else:
            h2, l2 = [], []
        ax.set_xlabel("time s")
        ax.set_ylabel("workers")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{k[0]} @ {k[1]} GPUs: pool sizes and load")
        h1, l1 = ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, ncol=4, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2))
        p = os.path.join(img_dir, f"planner_timeline_{k[0].replace(' ', '_')}_{k[1]}.png")
        fig.savefig(p, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def _load_series(tl: list) -> list[tuple[float, float, float]]:
    """(t, arrivals/s, output tokens/s) between consecutive timeline samples."""
    out = []
    for a, b in zip(tl, tl[1:]):
        if len(a) < 6 or len(b) < 6 or b[0] <= a[0]:
            continue
        dt = b[0] - a[0]
        out.append((b[0], (b[4] - a[4]) / dt, (b[5] - a[5]) / dt))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.planner.study")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--gpus", type=int, required=True)
    r.add_argument("--workloads", default="conv,code,bursty,bursty-swing")
    r.add_argument("--policies", default="planner,planner-scale,dynamo")
    r.add_argument("--duration", action="append", default=[], metavar="WORKLOAD=SECONDS")
    r.add_argument("--cands", action="append", default=[], metavar="WORKLOAD=P1,P2,...",
                   help="static prefill counts to try first (default: all for G<=8, else 20..80%%)")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--timeout", type=float, default=None, help="CPU seconds per static run (dynamic runs: 2x)")
    r.add_argument("--extra", default="{}", help="JSON merged into every spec")
    r.add_argument("--out", required=True)
    rp = sub.add_parser("report")
    rp.add_argument("files", nargs="+")
    rp.add_argument("--img", default="docs/img")
    rp.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "run":
        durs = {"conv": 600.0, "code": 600.0, "bursty": 600.0, "bursty-swing": 480.0}
        for kv in a.duration:
            k, v = kv.split("=", 1)
            durs[k] = float(v)
        cands = {}
        for kv in a.cands:
            k, v = kv.split("=", 1)
            cands[k] = [int(x) for x in v.split(",") if x]
        t0 = time.perf_counter()
        os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)

        def save(res):
            with open(a.out, "w") as f:
                json.dump({"gpus": a.gpus, "wall_s": round(time.perf_counter() - t0, 1),
                           "results": res}, f)

        res = study(a.gpus, a.workloads.split(","), a.jobs, durs,
                    [p for p in a.policies.split(",") if p], json.loads(a.extra), cands,
                    a.timeout, save)
        save(res)
        print(table(res))
        return 0
    res = []
    for fn in a.files:
        with open(fn) as f:
            res += json.load(f)["results"]
    res = dedupe(res)
    md = "## Results\n\n" + table(res) + "\n\n## Static sweep\n\n" + sweep_table(res) + "\n"
    ps = plots(res, a.img)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md)
    print("plots:", *ps, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
