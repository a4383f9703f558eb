"""`tandem sim`: the real router (and planner) over N simulated engines, in virtual time.

Wiring: `tandem/cli.py` calls `add_parser(subparsers)` and, for the "sim" command, `run(args)`,
whose return value is the exit code. `python -m tandem.sim ...` runs the same thing.

The load flags are those of `tandem bench` (same names, same meaning, same planning code), so the
validation of a real run is one command: repeat the bench run's load flags with `tandem sim`.

Exit codes: 0 ok; 1 the run finished but no request succeeded; 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from tandem.bench.loadargs import add_load_arguments
from tandem.common.argtypes import nonneg as _nonneg
from tandem.common.argtypes import positive as _positive

EXIT_OK, EXIT_NO_SUCCESS, EXIT_BAD_INPUT = 0, 1, 2

EPILOG = """\
examples:
  tandem sim --trace ../shared/traces/azure2023_conv_181546-184500.csv --gpus 8 \\
      --profile profiles/h100_llama-3.1-8b.json --time-scale 0.1 --out sim.json --plot plots/
  tandem sim --workload bursty --rate 20 --duration 600 --prefill 2 --decode 6 --planner \\
      --slo-ttft-ms 1000 --slo-tpot-ms 50 --profile synthetic:8b --out b.json
  # 1,000 GPUs for the whole trace: 16 router domains (within 3% of one router), on every core
  tandem sim --trace ../shared/traces/azure2023_conv_181546-184500.csv --gpus 1000 --replicate 2700 \\
      --shards 16 --block-size 64 --records none --token-times none --profile profiles/h100_llama-3.1-8b.json --out g.json
  # validation: the same flags as the bench run against `tandem serve` on one GPU
  tandem sim --trace conv.csv --duration 300 --gpus 1 --profile P.json --out sim.json

The profile is a `tandem profile` JSON (or synthetic[:8b|1b], a roofline estimate, NOT a measurement).
--replicate R with --time-scale scales a trace to many GPUs (see docs/sim.md).
"""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("load (same flags and meaning as tandem bench)")
    add_load_arguments(g, required=True, max_concurrency_help="cap requests in flight at the client, as tandem "
                       "bench does (the wait shows as dispatch lag)")
    g.add_argument("--replicate", type=_positive(int), default=1,
                   help="R copies of the planned requests (scale a trace to many GPUs)")
    g.add_argument("--replicate-shift", choices=("random", "none"), default="random",
                   help="shift each copy circularly by a random offset (default) or not at all")

    g = p.add_argument_group("accepted for copy-paste from a tandem bench command; no effect here")
    for flag in ("--url", "--model", "--api-key", "--endpoint", "--prompt-mode", "--tokenizer", "--token-range",
                 "--priority-format", "--temperature", "--extra-body", "--request-timeout", "--poll-interval",
                 "--save-requests"):
        g.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in ("--no-cluster-poll", "--dry-run"):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    g.add_argument("--send-priority", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("cluster")
    g.add_argument("--profile", required=True, metavar="P.json",
                   help="perf profile from `tandem profile` (or synthetic[:8b|1b], NOT measured)")
    g.add_argument("--gpus", type=_positive(int), default=None, help="workers (one GPU each); alone: all role both")
    g.add_argument("--prefill", type=_nonneg(int), default=None, help="prefill workers (disaggregated)")
    g.add_argument("--decode", type=_nonneg(int), default=None, help="decode workers (disaggregated)")
    g.add_argument("--router-mode", choices=("kv", "round-robin", "least-loaded"), default="kv")
    g.add_argument("--router-impl", choices=("indexed", "base"), default="indexed",
                   help="indexed: KvRouter with O(log workers) selection, same decisions (default); "
                        "base: KvRouter as is (O(requests in flight) per decision)")
    g.add_argument("--shards", type=_positive(int), default=1, metavar="K",
                   help="K independent domains (a router, and planner, each over 1/K of the workers and "
                        "of the requests), merged into one report; 1 (default): one router over all")
    g.add_argument("--jobs", type=_positive(int), default=None, metavar="J",
                   help="processes running the --shards domains (default: one per core, at most K); "
                        "the result does not depend on it")
    g.add_argument("--publish-interval", type=_positive(float), default=0.25,
                   help="seconds between worker status / KV event reports to the router (virtual)")
    g.add_argument("--transfer-gbps", type=_positive(float), default=None,
                   help="KV transfer bandwidth in GB/s (default: the profile's copy_bandwidth_gbps)")
    g.add_argument("--transfer-latency-ms", type=_nonneg(float), default=1.0, help="fixed cost per KV transfer")
    g.add_argument("--local-prefill-tokens", type=_nonneg(int), default=256,
                   help="disaggregated: prompts with at most this many uncached tokens prefill on the decode worker "
                        "(default 256, as `tandem serve --local-prefill-max-tokens`; 0: every prompt goes remote)")
    g.add_argument("--prefill-queue-factor", type=_nonneg(float), default=4.0,
                   help="disaggregated: ... or when the prefill worker's queue exceeds this multiple of the decode "
                        "worker's (default 4, as `tandem serve`; 0: off)")
    g.add_argument("--spill-batch", action="store_true",
                   help="the queue rule also sends batch prompts to decode workers (as `tandem serve --spill-batch`)")
    g.add_argument("--request-overhead-ms", type=_nonneg(float), default=None,
                   help="frontend + network time before the router sees a request "
                        "(default: the profile's serving_overhead.request_s, else 0)")

    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=_positive(int), default=None, help="default: the profile's")
    g.add_argument("--kv-blocks", type=_positive(int), default=None,
                   help="KV blocks per worker (default: profile kv_capacity_tokens / block size)")
    g.add_argument("--max-num-seqs", type=_positive(int), default=256)
    g.add_argument("--max-num-batched-tokens", type=_positive(int), default=None, help="default: the profile's")
    g.add_argument("--prefill-chunk-while-decoding", type=_positive(int), default=None,
                   help="prompt tokens a step with decodes may carry (default: the step budget)")
    g.add_argument("--max-model-len", type=_positive(int), default=None)
    g.add_argument("--prefix-caching", choices=("auto", "on", "off"), default="auto",
                   help="auto: on when the requests carry prefix hash ids (Mooncake, workload prefixes); "
                        "traces without them have no shared prefixes, so caching could not hit")
    g.add_argument("--aging-s", type=float, default=30.0)
    g.add_argument("--mixed-model", choices=("shared", "sum", "max"), default=None,
                   help="step time of mixed prefill+decode steps (default: the profile's mixed_model, else shared)")
    g.add_argument("--role-flip-s", type=_nonneg(float), default=None, help="override the profile's role_flip_s")
    g.add_argument("--worker-start-s", type=_nonneg(float), default=None,
                   help="override the profile's worker_start_s")
    g.add_argument("--step-overhead-ms", type=_nonneg(float), default=None,
                   help="serving host time added to every engine step "
                        "(default: the profile's serving_overhead.step_s, else 0)")
    g.add_argument("--seq-overhead-ms", type=_nonneg(float), default=None,
                   help="serving host time per sequence in a step "
                        "(default: the profile's serving_overhead.seq_s, else 0)")
    g.add_argument("--new-overhead-ms", type=_nonneg(float), default=None,
                   help="serving host time per request in its first engine step "
                        "(default: the profile's serving_overhead.new_s, else 0)")
    g.add_argument("--new-overhead-per", choices=("request", "prefill_step"), default=None,
                   help="admission time charged per request in its first step, or once per step holding "
                        "prefill work (default: the profile's serving_overhead.new_per, else request)")
    g.add_argument("--no-fast-forward", action="store_true",
                   help="call the scheduler every step (slower; same results)")

    g = p.add_argument_group("planner")
    g.add_argument("--planner", nargs="?", const="tandem", default=None, metavar="NAME",
                   help="run a planner: tandem (default) or dynamo (the baseline)")
    g.add_argument("--planner-arg", action="append", metavar="KEY=VALUE",
                   help="planner config field (tandem.planner.types.PlannerConfig / DynamoConfig)")
    g.add_argument("--planner-tick", type=_positive(float), default=1.0, help="seconds (virtual)")
    g.add_argument("--planner-window", type=_positive(float), default=5.0,
                   help="metrics window the planner sees (seconds)")
    g.add_argument("--min-gpus", type=_positive(int), default=None, help="let the planner scale in to N")
    g.add_argument("--max-gpus", type=_positive(int), default=None, help="let the planner scale out to N")

    g = p.add_argument_group("report")
    g.add_argument("--out", required=True, metavar="FILE.json")
    g.add_argument("--plot", default=None, metavar="DIR", help="latency_cdf.png and timeline.png")
    g.add_argument("--slo-ttft-ms", type=_positive(float), default=None)
    g.add_argument("--slo-tpot-ms", type=_positive(float), default=None)
    g.add_argument("--slo", action="append", default=[], metavar="CLASS:TTFT_MS:TPOT_MS")
    g.add_argument("--gpu-hour-usd", type=_positive(float), default=None)
    g.add_argument("--label", default=None)
    g.add_argument("--token-times", default="auto",
                   help="per-token times in the report: all, none, every:K (every K-th request), "
                        f"auto (all up to a few million tokens, else sampled)")
    g.add_argument("--records", choices=("all", "none"), default="all",
                   help="none: leave the per-request list out of the JSON (the summary still covers all)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--quiet", action="store_true")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sim", help="simulate a cluster (router, planner, N engines) in virtual time",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem sim", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


def run(args) -> int:
    from rich.console import Console

    from tandem.bench import traces as tr
    from tandem.bench import workloads as wl
    from tandem.bench.report import OutputError, print_summary, save_outputs
    from tandem.sim.profile import ProfileError, SimProfile
    from tandem.sim.run import SimInputError, plan, simulate
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)

    def fail(code: int, msg: str) -> int:
        err.print(f"[bold red]error:[/] {msg}")
        return code

    try:
        from tandem.bench.cli import InputError
    except ImportError:  # pragma: no cover
        InputError = ValueError
    try:
        profile = SimProfile.load(args.profile)
        args.profile = profile
        reqs, info = plan(args)
    except (ProfileError, tr.TraceError, wl.WorkloadError, InputError, SimInputError) as e:
        return fail(EXIT_BAD_INPUT, str(e))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return fail(EXIT_BAD_INPUT, f"cannot create the directory of --out: {e}")
    if not args.quiet:
        tag = " [yellow](synthetic profile, not measured)[/]" if profile.synthetic else ""
        err.print(f"tandem sim: {len(reqs)} requests from {info['source']} over {reqs[-1].arrival_s:.1f} s, "
                  f"profile {profile.model or '?'} on {profile.device or '?'}{tag}")
    progress = None if (args.quiet or args.no_progress) else _Progress(err, len(reqs))
    try:
        report, cluster = simulate(args, reqs, info, progress=progress)
    except SimInputError as e:
        return fail(EXIT_BAD_INPUT, str(e))
    finally:
        if progress is not None:
            progress.close()
    try:
        plots = save_outputs(report, args.out, args.plot)
    except OutputError as e:
        return fail(EXIT_BAD_INPUT, str(e))
    sim = report["config"]["sim"]
    if not args.quiet:
        print_summary(report, out)
        err.print(f"simulated {sim['virtual_s']:.1f} s on {sim['workers']} workers in "
                  f"{report['config']['wall_s']:.1f} s wall ({sim['speedup']}x real time); "
                  f"{sim['events']} events, {sim['engine_steps']} engine steps "
                  f"({sim['window_steps']} fast-forwarded)")
        if sim["kv_leaks"]:
            err.print(f"[red]KV blocks still held at the end: {sim['kv_leaks']}[/]")
        err.print(f"report: {args.out}" + (f"; plots: {', '.join(plots)}" if plots else ""))
    if report["summary"]["overall"]["requests_completed"] == 0:
        return fail(EXIT_NO_SUCCESS, "no request succeeded")
    return EXIT_OK


class _Progress:
    """Virtual-time progress on stderr, refreshed at most twice a second of wall time."""

    def __init__(self, console, total: int):
        self.console = console
        self.total = total
        self.last = 0.0
        self.t0 = time.perf_counter()
        self.live = console.is_terminal

    def __call__(self, c) -> None:
        now = time.perf_counter()
        if now - self.last < 0.5 or not self.live:
            return
        self.last = now
        wall = now - self.t0
        self.console.file.write(
            f"\r  t={c.now:9.1f} s virtual  {c.completed + c.failed}/{self.total} done  in flight "
            f"{c.sent - c.completed - c.failed}  ({c.now / wall if wall > 0 else 0:.0f}x real time)   ")
        self.console.file.flush()

    def close(self) -> None:
        if self.live and self.last:
            self.console.file.write("\n")
            self.console.file.flush()


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
