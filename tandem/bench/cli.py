"""`tandem bench`: replay a trace or a synthetic workload open-loop against an OpenAI-compatible
server and write the report JSON (plus optional plots).

Wiring: `tandem/cli.py` calls `add_parser(subparsers)` and, for the "bench" command, `run(args)`,
whose return value is the exit code. `python -m tandem.bench ...` runs the same thing.

Exit codes: 0 ok; 1 the run finished but no request succeeded; 2 bad input (arguments, trace,
workload, tokenizer); 3 the server cannot be used (unreachable, unknown model, auth).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import sys
import time

from tandem.bench import traces as tr
from tandem.bench import workloads as wl
from tandem.bench.client import BenchError, ClientConfig, Runner, preflight, probe
from tandem.bench.loadargs import add_load_arguments
from tandem.bench.prompts import PromptBuilder, PromptError, load_tokenizer
from tandem.bench.report import OutputError, build_report, load_config, print_summary, save_outputs
from tandem.common.argtypes import positive as _positive

EXIT_OK, EXIT_NO_SUCCESS, EXIT_BAD_INPUT, EXIT_SERVER = 0, 1, 2, 3

EPILOG = """\
examples:
  tandem bench --url http://127.0.0.1:8000 --trace ../shared/traces/azure2023_conv_181546-184500.csv \\
      --time-scale 0.5 --duration 120 --slo-ttft-ms 500 --slo-tpot-ms 50 --gpus 2 --gpu-hour-usd 2.5 \\
      --out conv.json --plot plots/
  tandem bench --url http://127.0.0.1:8000 --workload bursty --rate 4 --duration 300 \\
      --wl burst_period_s=60,burst_factor=4 --slo chat:300:40 --slo summarize:5000:200 --out b.json
  tandem bench --url http://vllm:8000 --model meta-llama/Llama-3.1-8B --tokenizer /models/llama \\
      --trace a.csv#chat:interactive --trace b.csv#batch:batch --priority-format int --out vllm.json
  tandem bench --compare tandem.json vllm.json dynamo.json --plot cmp/

Metrics follow vLLM's bench serve (TTFT to first output chunk; TPOT = (E2E - TTFT)/(tokens - 1);
ITL = gaps between chunks). --time-scale multiplies trace timestamps (0.5 = twice as fast).
"""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("server")
    g.add_argument("--url", default=None, help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    g.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions (exact ISL; default) or /v1/chat/completions (text prompts)")

    g = p.add_argument_group("load")
    add_load_arguments(g)

    g = p.add_argument_group("requests")
    g.add_argument("--prompt-mode", choices=("auto", "ids", "text"), default="auto",
                   help="ids: token-id prompts (exact, no tokenizer); text: words (exact with --tokenizer); "
                        "auto: text if --tokenizer is given, else ids")
    g.add_argument("--tokenizer", default=None, metavar="DIR", help="dir with the served model's tokenizer.json")
    g.add_argument("--token-range", default=None, metavar="LO:HI",
                   help="token ids for ids mode (default: the tokenizer's vocabulary, else 10:250)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="force the output length: send ignore_eos=true and min_tokens=max_tokens")
    g.add_argument("--send-priority", action=argparse.BooleanOptionalAction, default=None,
                   help="send the class priority (default: only when the server is Tandem)")
    g.add_argument("--priority-format", choices=("name", "int"), default="name",
                   help="name: interactive/standard/batch (Tandem); int: 0/1/2 (vLLM)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--extra-body", default=None, metavar="JSON", help="fields merged into every request body")
    g.add_argument("--request-timeout", type=_positive(float), default=600.0, help="seconds per request")

    g = p.add_argument_group("report")
    g.add_argument("--out", default=None, metavar="FILE.json", help="report JSON (required to run)")
    g.add_argument("--compare", nargs="+", default=None, metavar="REPORT.json",
                   help="compare existing reports (the first is the baseline) instead of running; "
                        "--plot DIR adds compare_cdf.png")
    g.add_argument("--plot", default=None, metavar="DIR", help="write latency_cdf.png and timeline.png here")
    g.add_argument("--slo-ttft-ms", type=_positive(float), default=None)
    g.add_argument("--slo-tpot-ms", type=_positive(float), default=None)
    g.add_argument("--slo", action="append", default=[], metavar="CLASS:TTFT_MS:TPOT_MS",
                   help="per-class SLO ('-' for none), overrides --slo-*-ms for that class")
    g.add_argument("--gpus", type=_positive(float), default=None,
                   help="GPUs serving (for goodput per GPU and cost); default: from /v1/cluster if present")
    g.add_argument("--gpu-hour-usd", type=_positive(float), default=None, help="price of one GPU hour")
    g.add_argument("--label", default=None, help="a name for this run, stored in the config")
    g.add_argument("--poll-interval", type=_positive(float), default=1.0, help="timeline sampling period (s)")
    g.add_argument("--no-cluster-poll", action="store_true", help="do not poll /v1/cluster")
    g.add_argument("--save-requests", default=None, metavar="FILE.jsonl",
                   help="also write the planned requests as generic JSONL (replayable with --trace)")
    g.add_argument("--no-probe", action="store_true",
                   help="skip the one-request test that checks the server accepts our requests")
    g.add_argument("--dry-run", action="store_true", help="plan the requests, print their shape, send nothing")
    g.add_argument("--no-progress", action="store_true", help="no live progress bar")
    g.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on an argparse subparsers object; dispatch with `run(args)`."""
    p = subparsers.add_parser(
        "bench", help="replay a trace or synthetic workload against an OpenAI-compatible server",
        description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


# --------------------------------------------------------------------------------------- helpers

class InputError(ValueError):
    pass


def _parse_slos(items: list[str]) -> dict:
    out = {}
    for s in items:
        parts = s.split(":")
        if len(parts) != 3 or not parts[0]:
            raise InputError(f"--slo expects CLASS:TTFT_MS:TPOT_MS, got {s!r}")

        def num(x):
            if x in ("", "-", "none"):
                return None
            try:
                v = float(x)
            except ValueError:
                raise InputError(f"--slo {s!r}: {x!r} is not a number") from None
            if v <= 0:
                raise InputError(f"--slo {s!r}: values must be > 0")
            return v
        out[parts[0]] = {"ttft_ms": num(parts[1]), "tpot_ms": num(parts[2])}
    return out


def _auto_jitter(reqs: list[tr.BenchRequest]) -> float:
    """Tick size of a trace whose timestamps are quantized (many rows share one), else 0."""
    uniq = sorted({round(r.arrival_s, 6) for r in reqs})
    if len(reqs) < 10 or len(uniq) < 2 or len(uniq) > 0.5 * len(reqs):
        return 0.0
    gaps = sorted(b - a for a, b in zip(uniq, uniq[1:]))
    return float(gaps[len(gaps) // 2])


def plan_requests(args) -> tuple[list[tr.BenchRequest], dict]:
    """The requests to send and a description of where they came from (for the config)."""
    info: dict = {}
    if args.trace:
        parts, jitters, names = [], [], []
        for spec in args.trace:
            path, cls, prio = tr.parse_trace_spec(spec)
            raw = tr.read_trace(path, cls=cls, priority=prio)
            j = _auto_jitter(raw) if str(args.jitter) == "auto" else float(args.jitter)
            if j < 0:
                raise InputError("--jitter must be >= 0")
            jitters.append(j)
            names.append(os.path.basename(path))
            parts.append(tr.prepare_trace(
                raw, start_s=args.trace_start, jitter_s=j, time_scale=args.time_scale,
                duration_s=args.duration, max_requests=args.max_requests, max_isl=args.max_isl,
                max_osl=args.max_osl, classify=args.classify, shape_ratio=args.shape_ratio,
                seed=args.seed))
        reqs = tr.merge(*parts)
        if args.max_requests is not None:
            reqs = reqs[: args.max_requests]
        if args.rate is not None:
            times = wl.arrivals((len(reqs), None), args.rate, args.arrival or "poisson",
                                args.cv or 1.0, seed=args.seed)
            reqs = tr.retime(reqs, times)
        info.update(source="trace:" + "+".join(names), traces=list(args.trace), jitter_s=jitters)
    else:
        params = wl.WorkloadParams()
        if args.workload not in wl.WORKLOADS:
            raise wl.WorkloadError(f"unknown workload {args.workload!r}; choose one of "
                                   f"{', '.join(wl.WORKLOADS)}")
        kv = wl.parse_kv(args.wl)
        if args.rate is not None:
            kv.setdefault("rate", str(args.rate))
        if args.arrival is not None:
            kv.setdefault("arrival", args.arrival)
        if args.cv is not None:
            kv.setdefault("cv", str(args.cv))
        params.update(kv)
        duration = args.duration if (args.duration or args.max_requests) else 60.0
        reqs = wl.generate(args.workload, params, duration_s=duration,
                           max_requests=args.max_requests, seed=args.seed)
        reqs = [tr.cap_lengths(r, args.max_isl, args.max_osl) for r in reqs]
        info.update(source=f"workload:{args.workload}", workload=args.workload,
                    workload_params=params.to_dict())
    reqs = tr.finalize(reqs)
    if not reqs:
        raise InputError("no requests to send (check --duration, --trace-start, --max-requests)")
    return reqs, info


def _make_prompts(args) -> PromptBuilder:
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    mode = args.prompt_mode
    if mode == "auto":
        mode = "text" if (tok is not None or args.endpoint == "chat") else "ids"
    if args.endpoint == "chat" and mode == "ids":
        raise InputError("--endpoint chat sends text: use --prompt-mode text (with --tokenizer for exact ISL)")
    rng = None
    if args.token_range:
        try:
            lo, hi = (int(x) for x in args.token_range.split(":"))
        except ValueError:
            raise InputError(f"--token-range expects LO:HI, got {args.token_range!r}") from None
        rng = (lo, hi)
    return PromptBuilder(mode, tokenizer=tok, token_range=rng, seed=args.seed)


def _shape(reqs: list[tr.BenchRequest]) -> dict:
    import numpy as np
    out = {}
    for c in sorted({r.cls for r in reqs}):
        sub = [r for r in reqs if r.cls == c]
        isl = np.array([r.isl for r in sub])
        osl = np.array([r.osl for r in sub])
        out[c] = {"requests": len(sub), "priority": sorted({r.priority for r in sub}),
                  "isl_mean": float(isl.mean()), "isl_p50": float(np.median(isl)), "isl_max": int(isl.max()),
                  "osl_mean": float(osl.mean()), "osl_p50": float(np.median(osl)), "osl_max": int(osl.max())}
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    out["_all"] = {"requests": len(reqs), "span_s": span,
                   "mean_rate": (len(reqs) - 1) / span if span > 0 else None}
    return out


def save_requests(path: str, reqs: list[tr.BenchRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in reqs:
            d = {"arrival_s": round(r.arrival_s, 6), "isl": r.isl, "osl": r.osl, "class": r.cls,
                 "priority": r.priority}
            if r.hash_ids:
                d["hash_ids"] = r.hash_ids
                d["block_size"] = r.block_size
            f.write(json.dumps(d) + "\n")


# ------------------------------------------------------------------------------------------ run

def run(args) -> int:
    """Run `tandem bench` for parsed arguments; returns the exit code."""
    from rich.console import Console
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False)

    def fail(code: int, msg: str) -> int:
        err.print(f"[bold red]error:[/] {msg}")
        return code

    if args.compare:
        from tandem.bench.compare import compare_files
        return compare_files(args.compare, args.plot, out)
    missing = [flag for flag, v in (("--url", args.url), ("--out", args.out)) if not v]
    if not (args.trace or args.workload):
        missing.append("--trace FILE or --workload NAME")
    if args.dry_run and "--url" in missing:
        missing.remove("--url")
    if missing:
        return fail(EXIT_BAD_INPUT, "missing " + ", ".join(missing) + " (see tandem bench --help)")

    # ---- plan
    try:
        slo_by_class = _parse_slos(args.slo)
        extra = json.loads(args.extra_body) if args.extra_body else {}
        if not isinstance(extra, dict):
            raise InputError("--extra-body must be a JSON object")
        reqs, src_info = plan_requests(args)
        prompts = _make_prompts(args)
    except json.JSONDecodeError as e:
        return fail(EXIT_BAD_INPUT, f"--extra-body is not valid JSON: {e}")
    except (tr.TraceError, wl.WorkloadError, PromptError, InputError) as e:
        return fail(EXIT_BAD_INPUT, str(e))
    if args.save_requests:
        save_requests(args.save_requests, reqs)
    shape = _shape(reqs)
    if args.dry_run:
        out.print_json(json.dumps({"source": src_info["source"], "plan": shape}))
        return EXIT_OK
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            return fail(EXIT_BAD_INPUT, f"cannot create the directory of --out: {e}")

    cfg = ClientConfig(
        url=args.url, model=args.model, endpoint=args.endpoint, ignore_eos=args.ignore_eos,
        send_priority=args.send_priority, priority_format=args.priority_format, api_key=args.api_key,
        request_timeout=args.request_timeout, temperature=args.temperature, extra_body=extra,
        poll_cluster=not args.no_cluster_poll, poll_interval=args.poll_interval,
        max_concurrency=args.max_concurrency)

    # ---- run
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    show_progress = not (args.no_progress or args.quiet)
    try:
        info = asyncio.run(preflight(cfg))
        send_priority = info.is_tandem if args.send_priority is None else args.send_priority
        if not args.no_probe:
            asyncio.run(probe(cfg, info, prompts, send_priority))
    except BenchError as e:
        return fail(EXIT_SERVER, str(e))
    if not args.quiet:
        err.print(f"tandem bench: {len(reqs)} requests from {src_info['source']} over "
                  f"{reqs[-1].arrival_s:.1f} s → {cfg.endpoint_url} (model {info.model}, "
                  f"prompts: {prompts.mode}{', priority sent' if send_priority else ''})")
    wall0 = time.time()
    records, timeline, cpu_s, t0 = _run_with_progress(cfg, reqs, prompts, info, send_priority, show_progress, err)
    wall = time.time() - wall0

    config = {
        "tool": "tandem bench",
        "version": _version(),
        "label": args.label,
        "started_at": started,
        "wall_s": round(wall, 3),
        # time 0 of the schedule on this host's CLOCK_MONOTONIC (time.monotonic), to line the run up with
        # events a server on the same host timestamps with its own monotonic clock (planner decisions)
        "t0_monotonic": round(t0, 6),
        "client_cpu_s": round(cpu_s, 3),
        "url": cfg.base,
        "endpoint": cfg.endpoint,
        "model": info.model,
        "server_is_tandem": info.is_tandem,
        "cluster_polled": info.has_cluster and cfg.poll_cluster,
        **src_info,
        "plan": shape,
        **load_config(args),
        "prompt_mode": prompts.mode,
        "tokenizer": args.tokenizer,
        "ignore_eos": args.ignore_eos,
        "send_priority": send_priority,
        "priority_format": args.priority_format,
        "max_concurrency": args.max_concurrency,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
        "slo_by_class": slo_by_class,
        "gpus": args.gpus,
        "gpu_hour_usd": args.gpu_hour_usd,
    }
    report = build_report(config, records, timeline)
    try:
        plots = save_outputs(report, args.out, args.plot)
    except OutputError as e:
        return fail(EXIT_BAD_INPUT, str(e))
    if not args.quiet:
        print_summary(report, out)
        err.print(f"report: {args.out}" + (f"; plots: {', '.join(plots)}" if plots else ""))
    over = report["summary"]["overall"]
    if over["requests_completed"] == 0:
        kinds = ", ".join(f"{k}={v}" for k, v in over["errors"].items())
        return fail(EXIT_NO_SUCCESS, f"no request succeeded ({kinds})")
    return EXIT_OK


def _version() -> str:
    try:
        import tandem
        return tandem.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _run_with_progress(cfg, reqs, prompts, info, send_priority, show, console):
    if not show:
        runner = Runner(cfg, reqs, prompts)
        records, timeline = asyncio.run(runner.run(info.model, send_priority))
        return records, timeline, runner.cpu_s, runner.t0
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    progress = Progress(TextColumn("[bold]bench"), BarColumn(bar_width=24), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                        console=console, refresh_per_second=4)
    task = progress.add_task("bench", total=len(reqs), info="")

    def update(r: Runner):
        progress.update(task, completed=r.completed + r.failed,
                        info=f"in flight {r.in_flight} · err {r.failed} · {r.out_tokens} tok · "
                             f"lag≤{r.max_lag * 1e3:.0f}ms")

    runner = Runner(cfg, reqs, prompts, on_update=update)
    with progress:
        records, timeline = asyncio.run(runner.run(info.model, send_priority))
    return records, timeline, runner.cpu_s, runner.t0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
