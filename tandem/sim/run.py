"""Build and run one simulation from parsed `tandem sim` arguments; produce the bench report.

Requests come from the bench's own planning (`tandem.bench.cli.plan_requests`: the same trace
readers, slicing, jitter, time scaling, workloads and seeds), so `tandem sim` with the flags of a
`tandem bench` run replays exactly the requests that run sent. The report is built by
`tandem.bench.report.build_report` and plotted by `tandem.bench.plots`, so the two compare line by
line.

Scaling a trace up (`--replicate R`): R copies of the planned requests; copy r's arrivals are shifted
circularly by a random fraction of the span (`--replicate-shift random`, seeded; the span and the
mean rate x R are kept, bursts land at different times in different copies) or not at all
(`none`: every burst is R times taller). Copies never share prefix blocks (their hash ids live in
different namespaces). Together with `--time-scale` (compress time) this sets the load.
"""
from __future__ import annotations

import datetime as _dt
import math
import random
import time
from dataclasses import replace

from tandem._compiled import compiled_modules
from tandem.engine.sim_engine import SimEngineConfig
from tandem.sim.cluster import ClusterConfig, SimCluster
from tandem.sim.profile import SimProfile
from tandem.sim.stream import ReplicatedRequests, report_from_columns

TOKEN_TIMES_BUDGET = 3_000_000     # per-token times kept in the report by --token-times auto


class SimInputError(ValueError):
    pass


def plan(args) -> tuple[list, dict]:
    """The request list (bench planning + replication) and a description for the config."""
    from tandem.bench import traces as tr
    from tandem.bench.cli import plan_requests
    reqs, info = plan_requests(args)
    R = int(getattr(args, "replicate", 1) or 1)
    if R > 1:
        info["replicate"] = R
        info["replicate_shift"] = getattr(args, "replicate_shift", "random")
        # = finalize(replicate(...)), generated lazily: millions of requests in bounded memory
        return ReplicatedRequests(tr.finalize(reqs), R, info["replicate_shift"], args.seed), info
    reqs = tr.finalize(reqs)
    return reqs, info


def replicate(reqs: list, R: int, shift: str = "random", seed: int = 0) -> list:
    if not reqs:
        return reqs
    t0 = min(r.arrival_s for r in reqs)
    span = max(r.arrival_s for r in reqs) - t0
    period = span + (span / max(1, len(reqs) - 1) if len(reqs) > 1 else 1.0)
    rng = random.Random(seed ^ 0x5EED)
    nss = max((r.namespace for r in reqs), default=0) + 1
    out = []
    for c in range(R):
        off = 0.0 if (c == 0 or shift == "none") else rng.random() * period
        for r in reqs:
            t = r.arrival_s - t0 + off
            if t >= period:
                t -= period
            out.append(replace(r, arrival_s=t0 + t, namespace=r.namespace + c * nss, idx=-1))
    out.sort(key=lambda r: r.arrival_s)
    return out


def roles_from_args(args) -> list[str]:
    P, D, G = args.prefill, args.decode, args.gpus
    if P is None and D is None:
        if G is None:
            raise SimInputError("give --gpus N (aggregated) or --prefill P --decode D (disaggregated)")
        return ["both"] * G
    P, D = P or 0, D or 0
    if P < 0 or D < 0:
        raise SimInputError("--prefill and --decode must be >= 0")
    if P == 0 and D > 0:
        raise SimInputError("disaggregated serving needs --prefill >= 1 (or use --gpus for aggregated)")
    if D == 0 and P > 0 and (G is None or G <= P):
        raise SimInputError("disaggregated serving needs --decode >= 1")
    both = 0
    if G is not None:
        if G < P + D:
            raise SimInputError(f"--gpus {G} is less than --prefill {P} + --decode {D}")
        both = G - P - D
    return ["prefill"] * P + ["decode"] * D + ["both"] * both


def _kv(items) -> dict:
    out = {}
    for it in items or []:
        for part in str(it).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise SimInputError(f"expected KEY=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            v = v.strip()
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = {"true": True, "false": False, "none": None}.get(v.lower(), v)
            out[k.strip().replace("-", "_")] = val
    return out


def make_planner(args, profile: SimProfile, n_gpus: int):
    name = args.planner
    if not name:
        return None, None
    extra = _kv(getattr(args, "planner_arg", None))
    if name in ("tandem", "default"):
        from tandem.planner.planner import Planner
        from tandem.planner.types import SPILL_PLANNER, PlannerConfig
        from tandem.router.disagg import DisaggPolicy
        # as `tandem serve --planner` builds it: an empty prefill pool allowed, seats from the engine config
        d = {"tick_s": args.planner_tick, "min_prefill": 0, "max_num_seqs": args.max_num_seqs}
        if args.slo_ttft_ms:
            d["slo_ttft_ms"] = args.slo_ttft_ms
        if args.slo_tpot_ms:
            d["slo_tpot_ms"] = args.slo_tpot_ms
        if args.min_gpus is not None:
            d["min_gpus"] = args.min_gpus
        if args.max_gpus is not None:
            d["max_gpus"] = args.max_gpus
        if DisaggPolicy(prefill_queue_factor=getattr(args, "prefill_queue_factor", 0.0),
                        spill_batch=bool(getattr(args, "spill_batch", False))).spills_batch:
            d.update(SPILL_PLANNER)           # as serve: the decode workers carry the edges
        d.update(extra)
        try:
            cfg = PlannerConfig.from_dict(d)
        except (TypeError, ValueError) as e:
            raise SimInputError(f"planner config: {e}") from None
        return Planner(cfg, profile=profile.raw), cfg.to_dict()
    if name == "dynamo":
        from tandem.planner.dynamo_baseline import DynamoBaseline, DynamoConfig
        d = {"max_gpu_budget": args.max_gpus or n_gpus}
        if args.slo_ttft_ms:
            d["slo_ttft_ms"] = args.slo_ttft_ms
        if args.slo_tpot_ms:
            d["slo_itl_ms"] = args.slo_tpot_ms
        d.update(extra)
        try:
            cfg = DynamoConfig(**d)
        except TypeError as e:
            raise SimInputError(f"dynamo planner config: {e}") from None
        return DynamoBaseline(cfg, profile=profile.raw), cfg.to_dict()
    raise SimInputError(f"unknown planner {name!r}; choose tandem or dynamo")


def token_times_mode(spec: str, reqs: list) -> str:
    if spec == "auto":
        total = sum(r.osl for r in getattr(reqs, "base", reqs)) * getattr(reqs, "R", 1)
        if total <= TOKEN_TIMES_BUDGET:
            return "all"
        return f"every:{math.ceil(total / TOKEN_TIMES_BUDGET)}"
    if spec in ("all", "none"):
        return spec
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "all" if k == 1 else spec
    raise SimInputError(f"--token-times must be auto, all, none or every:K, got {spec!r}")


def resolve_overheads(args, profile: SimProfile) -> dict:
    """Serving overheads in ms: a flag given on the command line wins, else the profile's
    ``serving_overhead`` (zeros in a profile without it; its admission-time quantiles `new_q_ms`
    unless --new-overhead-ms is given). `from` says which source each came from."""
    sv = profile.serving
    out, src = {}, {}
    for key, flag, prof_s in (("step_ms", "step_overhead_ms", sv.step_s), ("seq_ms", "seq_overhead_ms", sv.seq_s),
                              ("new_ms", "new_overhead_ms", sv.new_s),
                              ("request_ms", "request_overhead_ms", sv.request_s)):
        v = getattr(args, flag, None)
        out[key], src[key] = (float(v), "flag") if v is not None else (prof_s * 1e3, "profile")
    out["new_q_ms"] = ([x * 1e3 for x in sv.new_q] if sv.new_q and src["new_ms"] == "profile" else None)
    per = getattr(args, "new_overhead_per", None)
    out["new_per"], src["new_per"] = (per, "flag") if per else (sv.new_per, "profile")
    out["from"] = src
    return out


def simulate(args, reqs: list, src_info: dict, progress=None) -> tuple[dict, SimCluster | None]:
    """Run the simulation for planned requests; returns (report, cluster); the cluster is None
    with `--shards` > 1 (its domains ran in other processes)."""
    from tandem.bench.cli import _parse_slos, _shape
    from tandem.bench.report import build_report, load_config
    profile = SimProfile.load(args.profile) if isinstance(args.profile, str) else SimProfile.coerce(args.profile)
    if getattr(args, "mixed_model", None):
        profile.mixed_model = args.mixed_model
    if getattr(args, "role_flip_s", None) is not None:
        profile.role_flip_s = args.role_flip_s
    if getattr(args, "worker_start_s", None) is not None:
        profile.worker_start_s = args.worker_start_s
    ovh = resolve_overheads(args, profile)
    roles = roles_from_args(args)
    caching = args.prefix_caching
    if caching == "auto":
        caching = "on" if any(r.hash_ids for r in getattr(reqs, "base", reqs)) else "off"
    bs = args.block_size or profile.block_size
    ecfg = SimEngineConfig(
        block_size=bs, num_kv_blocks=args.kv_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        prefill_chunk_while_decoding=getattr(args, "prefill_chunk_while_decoding", None),
        enable_prefix_caching=(caching == "on"), aging_s=args.aging_s,
        step_overhead_s=ovh["step_ms"] / 1e3,
        seq_overhead_s=ovh["seq_ms"] / 1e3, new_overhead_s=ovh["new_ms"] / 1e3,
        new_overhead_q=tuple(x / 1e3 for x in ovh["new_q_ms"]) if ovh["new_q_ms"] else None,
        new_overhead_per=ovh["new_per"], fast_forward=not args.no_fast_forward)
    tt = token_times_mode(args.token_times, reqs)
    ccfg = ClusterConfig(
        roles=roles, router_mode=args.router_mode, publish_interval_s=args.publish_interval,
        planner_tick_s=args.planner_tick, planner_window_s=args.planner_window,
        transfer_gbps=args.transfer_gbps, transfer_latency_s=args.transfer_latency_ms / 1e3,
        local_prefill_tokens=args.local_prefill_tokens, request_overhead_s=ovh["request_ms"] / 1e3,
        prefill_queue_factor=getattr(args, "prefill_queue_factor", 0.0),
        spill_batch=bool(getattr(args, "spill_batch", False)),
        max_concurrency=getattr(args, "max_concurrency", None),
        token_times=tt, seed=args.seed, engine=ecfg,
        router_impl=getattr(args, "router_impl", "indexed"),
        keep_records=getattr(args, "records", "all") != "none")
    slo_by_class = _parse_slos(args.slo or [])
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    K = int(getattr(args, "shards", 1) or 1)
    cluster = None
    w0 = time.perf_counter()
    if K > 1:
        from tandem.sim.shards import (ShardError, merge_columns, merge_timelines, merge_totals, resolve_jobs,
                                       run_domains)
        jobs = resolve_jobs(K, getattr(args, "jobs", None))
        try:
            parts = run_domains(args, profile, ccfg, reqs, roles, K, jobs, make_planner, progress=progress)
        except ShardError as e:
            raise SimInputError(str(e)) from None
        wall = time.perf_counter() - w0
        cpu = sum(p.cpu_s for p in parts)
        planner_cfg = parts[0].planner_config
        decisions = sorted((d for p in parts for d in p.decisions), key=lambda d: (d.get("time", 0.0), d["domain"]))
        timeline = merge_timelines([p.timeline for p in parts])
        columns, records = merge_columns([p.columns for p in parts]), None
        stats = merge_totals(parts)
        shard_info = {"domains": K, "jobs": jobs,
                      "split": "prefix" if any(r.hash_ids for r in getattr(reqs, "base", reqs)) else "random",
                      "per_domain": [{"workers": len(p.roles), "roles": {r: p.roles.count(r) for r in
                                                                        ("prefill", "decode", "both")
                                                                        if p.roles.count(r)},
                                      "requests": p.requests, "virtual_s": round(p.totals["virtual"], 6),
                                      "cpu_s": round(p.cpu_s, 3), "events": p.totals["events"]}
                                     for p in parts]}
    else:
        planner, planner_cfg = make_planner(args, profile, len(roles))
        cluster = SimCluster(profile, ccfg, reqs, planner=planner)
        w0, c0 = time.perf_counter(), time.process_time()
        cluster.run(progress=progress)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        decisions, timeline, columns = cluster.decisions, cluster.timeline, cluster.columns
        records = cluster.records() if columns is None else None
        stats = cluster.totals()
        shard_info = None
    scaling = planner_cfg is not None and (args.min_gpus is not None or args.max_gpus is not None
                                           or args.planner == "dynamo")
    virtual = stats["virtual"]
    config = {
        "tool": "tandem sim",
        "version": _version(),
        "label": args.label,
        "started_at": started,
        "wall_s": round(wall, 3),
        "url": None,
        "endpoint": "completions",
        "model": profile.model,
        "server_is_tandem": True,
        "cluster_polled": True,
        **src_info,
        "plan": reqs.shape(_shape) if isinstance(reqs, ReplicatedRequests) else _shape(reqs),
        **load_config(args),
        "prompt_mode": "ids",
        "tokenizer": None,
        "ignore_eos": True,
        "send_priority": True,
        "priority_format": "name",
        "max_concurrency": getattr(args, "max_concurrency", None),
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
        "slo_by_class": slo_by_class,
        "gpus": None if scaling else len(roles),
        "gpu_hour_usd": args.gpu_hour_usd,
        "sim": {
            "profile": profile.describe(),
            "mixed_model": profile.mixed_model,
            "role_flip_s": profile.role_flip_s,
            "worker_start_s": profile.worker_start_s,
            "workers": len(roles),
            "roles": {r: roles.count(r) for r in ("prefill", "decode", "both") if roles.count(r)},
            "router_mode": args.router_mode,
            "planner": args.planner or None,
            "planner_config": planner_cfg,
            "planner_decisions": decisions,
            "engine": {"block_size": bs, "num_kv_blocks": stats["num_kv_blocks"],
                       "max_num_seqs": ecfg.max_num_seqs,
                       "max_num_batched_tokens": ecfg.max_num_batched_tokens,
                       "prefill_chunk_while_decoding": ecfg.prefill_chunk_while_decoding,
                       "max_model_len": ecfg.max_model_len, "prefix_caching": caching == "on",
                       "aging_s": ecfg.aging_s, "step_overhead_ms": ovh["step_ms"],
                       "seq_overhead_ms": ovh["seq_ms"], "new_overhead_ms": ovh["new_ms"],
                       "new_overhead_q_ms": ovh["new_q_ms"],
                       "new_overhead_per": ovh["new_per"],
                       "fast_forward": ecfg.fast_forward},
            "publish_interval_s": args.publish_interval,
            "transfer_gbps": args.transfer_gbps if args.transfer_gbps is not None else profile.copy_bandwidth_gbps,
            "transfer_latency_ms": args.transfer_latency_ms,
            "local_prefill_tokens": args.local_prefill_tokens,
            "prefill_queue_factor": getattr(args, "prefill_queue_factor", 0.0),
            "spill_batch": bool(getattr(args, "spill_batch", False)),
            "disagg_decisions": dict(sorted(stats.get("disagg_decisions", {}).items())),
            "request_overhead_ms": ovh["request_ms"],
            "overheads_from": ovh["from"],
            "token_times": tt,
            "virtual_s": round(virtual, 6),
            "speedup": round(virtual / wall, 2) if wall > 0 else None,
            "cpu_s": round(cpu, 3),
            "speedup_cpu": round(virtual / cpu, 2) if cpu > 0 else None,
            "compiled": compiled_modules(),           # mypyc extensions in use (python -m tandem.compile)
            "events": stats["events"],
            "engine_steps": stats["steps"],
            "window_steps": stats["win_steps"],
            "preemptions": stats["preemptions"],
            "gpu_hours_in_service": round(stats["gpu_seconds"] / 3600.0, 6),
            "kv_leaks": stats["leaks"],
        },
    }
    if shard_info is not None:
        config["sim"]["shards"] = shard_info
    if columns is not None:          # --records none (and --shards > 1): the summary from columns
        report = report_from_columns(config, columns, timeline)
    else:
        report = build_report(config, records, timeline)
    return report, cluster


def _version() -> str:
    try:
        import tandem
        return tandem.__version__
    except Exception:  # noqa: BLE001
        return "unknown"
