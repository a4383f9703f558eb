"""The `tandem` command.

    tandem serve [--model DIR|PRESET] [--workers N | --prefill P --decode D] [--planner]
                 [--slo-ttft-ms X --slo-tpot-ms Y] [--host H --port P] [--device cpu|cuda] [engine knobs]
    tandem model init DIR --preset P
    tandem bench ...          (tandem.bench.cli)
    tandem profile ... / tandem sim ...   (placeholders until they land)

`tandem serve` with no arguments serves the `tiny` preset (created once in $TANDEM_CACHE/models/tiny,
default ~/.cache/tandem/models/tiny) on http://127.0.0.1:8000 with one worker. The frontend process
never imports torch: models are created and engines run in subprocesses.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("tandem.serve")

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed without a traceback, exit code 2."""


# ============================================================================ helpers
def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE") or Path.home() / ".cache" / "tandem").expanduser()


def visible_gpus() -> list[int]:
    """Physical GPU indices this process may use, without importing torch."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        out = []
        for tok in cvd.split(","):
            tok = tok.strip()
            if tok.isdigit():
                out.append(int(tok))
            elif tok:
                return list(range(len([t for t in cvd.split(",") if t.strip()])))   # UUIDs: keep order
        return out
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return list(range(sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))))


def ensure_preset_model(preset: str, device: str = "cpu") -> Path:
    """The cached model dir of a preset, created (in a subprocess: torch stays out of the frontend) if missing."""
    from tandem.model.presets import get_preset
    get_preset(preset)   # raises UnknownPreset
    root = cache_root() / "models"
    d = root / preset
    if (d / "config.json").is_file():
        return d
    root.mkdir(parents=True, exist_ok=True)
    import fcntl
    with open(root / f".{preset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / "config.json").is_file():
            return d
        tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=root))
        print(f"tandem: creating the {preset!r} model in {d} (one time)", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "tandem.model.init", str(tmp / "m"), "--preset", preset,
               "--device", "cuda" if device.startswith("cuda") else "cpu"]
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CLIError(f"could not create the {preset!r} model (exit code {r.returncode})")
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp / "m", d)
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def resolve_model(spec: str | None, device: str) -> tuple[str, str]:
    """(model dir, default served name) for --model DIR|PRESET."""
    from tandem.model.presets import PRESETS
    spec = spec or "tiny"
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CLIError(f"{spec!r} is a directory without config.json (not a Hugging Face model dir)")
        return str(p.resolve()), p.resolve().name
    if spec in PRESETS:
        return str(ensure_preset_model(spec, device)), spec
    raise CLIError(f"--model {spec!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")


# ============================================================================ serve
def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("model and placement")
    g.add_argument("--model", default=None, help="HF-format model directory or preset name (default: tiny)")
    g.add_argument("--served-model-name", default=None, help="model name clients use (default: preset or dir name)")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes, all role 'both' (default: one per GPU on CUDA, 1 on CPU)")
    g.add_argument("--prefill", type=int, default=None, help="prefill workers (disaggregated serving)")
    g.add_argument("--decode", type=int, default=None, help="decode workers (disaggregated serving)")
    g.add_argument("--local-prefill-max-tokens", type=int, default=256,
                   help="disaggregated: prefill on the decode worker when at most this many prompt tokens are "
                        "uncached there")
    g.add_argument("--batch-on-prefill-max-tokens", type=int, default=None,
                   help="disaggregated: serve batch requests with max_tokens <= this whole on a prefill worker "
                        "(no KV transfer, off the decode pool); default 256, or 0 (off) with --planner or "
                        "--slo-tpot-ms, whose TPOT SLO covers batch requests too")
    g.add_argument("--prefill-queue-factor", type=float, default=4.0,
                   help="disaggregated: prefill locally when the prefill pool's queue exceeds this multiple of "
                        "the decode worker's")
    g.add_argument("--spill-batch", action="store_true",
                   help="disaggregated: that rule sends batch prompts to decode workers too (off: batch work waits "
                        "for the prefill pool); pair with --prefill-chunk-while-decoding to bound chat TPOT")
    g.add_argument("--planner", action="store_true",
                   help="run the planner: move workers between the prefill and decode pools in place")
    g.add_argument("--planner-profile", default=None,
                   help="perf profile JSON from `tandem profile` (default: profiles/ entry for the preset)")
    g.add_argument("--planner-tick-s", type=float, default=1.0, help="planner cadence (>= 0.25 s)")
    g.add_argument("--planner-min-prefill", type=int, default=0,
                   help="prefill workers the planner always keeps (default 0: when the decode workers can "
                        "absorb the prompts, the prefill pool empties and they prefill locally)")
    g.add_argument("--planner-min-decode", type=int, default=1)
    g.add_argument("--planner-min-dwell-s", type=float, default=5.0, help="a worker keeps a role this long")
    g.add_argument("--planner-cooldown-s", type=float, default=2.0, help="between two batches of flips")
    g.add_argument("--planner-reverse-cooldown-s", type=float, default=6.0,
                   help="before flipping in the opposite direction")
    g.add_argument("--planner-peak-window-s", type=float, default=10.0,
                   help="a pool keeps the largest need of this recent past (0: off)")
    g.add_argument("--planner-donor-memory-s", type=float, default=30.0,
                   help="a pool that gives a worker keeps room for its recent load, decaying (0: off)")
    g.add_argument("--planner-window-s", type=float, default=5.0, help="metrics window the planner reads")
    g.add_argument("--planner-min-gpus", type=int, default=None,
                   help="scale in down to this many workers (default: no scaling, flips only)")
    g.add_argument("--planner-max-gpus", type=int, default=None,
                   help="scale out up to this many workers, started as new processes (on CUDA: one per free GPU)")
    g.add_argument("--planner-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other PlannerConfig field (docs/planner.md), e.g. scale_in_delay_s=10; repeatable")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO for the planner")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO for the planner")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads per CPU worker (default: (cores - 1) / workers, at least 1)")

    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $TANDEM_API_KEY)")
    g.add_argument("--max-waiting", type=int, default=1024,
                   help="admission waiting room beyond the workers' run slots; batch may use 1/4, standard 1/2")
    g.add_argument("--log-level", default=os.environ.get("TANDEM_LOG_LEVEL", "info"))

    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=None, help="max running requests per worker")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per engine step")
    g.add_argument("--prefill-chunk-while-decoding", type=int, default=None,
                   help="prompt tokens a step that carries decodes may add (default: the step budget); bounds what "
                        "prompts prefilled on a decode worker (--spill-batch, --local-prefill-max-tokens) add to TPOT")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks per worker")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    g.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=None)

    g = p.add_argument_group("router")
    g.add_argument("--router-mode", default="kv", choices=("kv", "round-robin", "least-loaded"))
    g.add_argument("--kv-overlap-weight", type=float, default=1.0, help="weight of prefill blocks in the KV cost")
    g.add_argument("--kv-decode-weight", type=float, default=1.0, help="weight of active decode blocks")
    g.add_argument("--router-temperature", type=float, default=0.0, help="0: argmin; >0: softmax sampling")
    g.add_argument("--heartbeat-timeout", type=float, default=10.0,
                   help="seconds without a worker status before the worker counts as dead")
    g.add_argument("--worker-ready-timeout", type=float, default=600.0)
    return p


def _batch_on_prefill(args) -> int:
    """--batch-on-prefill-max-tokens, resolved: off when a TPOT SLO applies to every class (see DisaggPolicy)."""
    if args.batch_on_prefill_max_tokens is not None:
        return max(0, args.batch_on_prefill_max_tokens)
    return 0 if args.planner or args.slo_tpot_ms else 256


def _engine_config(args, device: str, n_workers: int) -> dict:
    cfg: dict = {"device": device}
    for k in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_while_decoding", "num_kv_blocks",
              "block_size", "dtype", "max_model_len",
              "kv_cache_memory_gb", "gpu_memory_utilization", "seed"):
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    if args.no_prefix_caching:
        cfg["enable_prefix_caching"] = False
    if device == "cpu":
        from tandem.runtime.local import cpu_count
        cfg["cpu_threads"] = args.cpu_threads or max(1, (cpu_count() - 1) // max(1, n_workers))
    return cfg


def _validate_serve_args(args) -> None:
    if args.prefill is not None or args.decode is not None:
        if args.workers is not None:
            raise CLIError("use either --workers N (aggregated) or --prefill P --decode D (disaggregated)")
        if (args.prefill or 0) < 1 or (args.decode or 0) < 1:
            raise CLIError("disaggregated serving needs --prefill >= 1 and --decode >= 1")
    if args.planner:
        if not args.prefill:
            raise CLIError("--planner needs disaggregated pools: --prefill P --decode D")
        if not args.planner_profile:
            raise CLIError("--planner needs --planner-profile PROFILE.json (made by `tandem profile`)")
        if not Path(args.planner_profile).is_file():
            raise CLIError(f"--planner-profile {args.planner_profile}: no such file")
        if not args.planner_window_s > 0:
            raise CLIError("--planner-window-s must be > 0")
        try:
            _planner_config(args, {})
        except (ValueError, TypeError) as e:
            raise CLIError(f"planner: {e}") from None
    if args.workers is not None and args.workers < 1:
        raise CLIError("--workers must be >= 1")
    for k in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_while_decoding", "num_kv_blocks",
              "block_size", "max_model_len"):
        v = getattr(args, k)
        if v is not None and v < 1:
            raise CLIError(f"--{k.replace('_', '-')} must be >= 1")
    if not (0 <= args.port < 65536):
        raise CLIError("--port must be in 0..65535 (0: any free port)")
    if args.max_waiting < 0:
        raise CLIError("--max-waiting must be >= 0")
    try:
        _disagg_policy(args)
    except ValueError as e:
        raise CLIError(f"disaggregation: {e} (--prefill-queue-factor, --local-prefill-max-tokens)") from None


def _disagg_policy(args):
    from tandem.router.disagg import DisaggPolicy
    return DisaggPolicy(args.local_prefill_max_tokens, args.prefill_queue_factor, _batch_on_prefill(args),
                        args.spill_batch)


def _planner_config(args, engine_cfg: dict):
    import dataclasses

    from tandem.planner.types import SPILL_PLANNER, PlannerConfig
    kw = dict(tick_s=args.planner_tick_s, slo_ttft_ms=args.slo_ttft_ms or 2000.0,
              slo_tpot_ms=args.slo_tpot_ms or 100.0, min_prefill=args.planner_min_prefill,
              min_decode=args.planner_min_decode, min_dwell_s=args.planner_min_dwell_s,
              cooldown_s=args.planner_cooldown_s, reverse_cooldown_s=args.planner_reverse_cooldown_s,
              peak_window_s=args.planner_peak_window_s, donor_memory_s=args.planner_donor_memory_s,
              min_gpus=args.planner_min_gpus, max_gpus=args.planner_max_gpus,
              max_num_seqs=engine_cfg.get("max_num_seqs", 256))
    if _disagg_policy(args).spills_batch:
        kw.update(SPILL_PLANNER)            # the decode workers carry the edges (--planner-set wins)
    names = {f.name for f in dataclasses.fields(PlannerConfig)}
    for item in args.planner_set:
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise CLIError(f"--planner-set {item!r}: expected KEY=VALUE with KEY a PlannerConfig field")
        try:
            kw[key] = json.loads(val)
        except json.JSONDecodeError:
            kw[key] = val                   # a bare string (e.g. predictor=holt)
    return PlannerConfig(**kw)


def build_server(args):
    """Everything `tandem serve` runs, without running it: (app, state, runtime, uvicorn config)."""
    from tandem.frontend.api import ServerConfig, ServerState, create_app
    from tandem.frontend.client import EngineClient
    from tandem.router.kv_router import KvRouter, RouterConfig, RouterWeights
    from tandem.runtime.base import WorkerSpec
    from tandem.runtime.local import LocalRuntime

    _validate_serve_args(args)
    gpus = visible_gpus() if args.device in ("auto", "cuda") else []
    if args.device == "cuda" and not gpus:
        raise CLIError("--device cuda but no GPU is visible")
    device = "cuda" if gpus else "cpu"
    roles = (["prefill"] * args.prefill + ["decode"] * args.decode) if args.prefill else None
    n = len(roles) if roles else (args.workers or (len(gpus) if device == "cuda" else 1))
    if device == "cuda" and n > len(gpus):
        raise CLIError(f"--workers {n} but only {len(gpus)} GPU(s) are visible (one worker per GPU)")
    if args.planner and device == "cuda" and (args.planner_max_gpus or 0) > len(gpus):
        raise CLIError(f"--planner-max-gpus {args.planner_max_gpus} but only {len(gpus)} GPU(s) are visible")
    model_dir, default_name = resolve_model(args.model, device)
    served = args.served_model_name or default_name
    engine_cfg = _engine_config(args, device, n)

    runtime = LocalRuntime(log_level=args.log_level.upper())
    router = KvRouter(RouterConfig(mode=args.router_mode, weights=RouterWeights(
        overlap_weight=args.kv_overlap_weight, decode_weight=args.kv_decode_weight,
        temperature=args.router_temperature)))
    client = EngineClient(runtime.out_addr, router, runtime, heartbeat_timeout=args.heartbeat_timeout,
                          disagg=_disagg_policy(args))
    specs = [WorkerSpec(f"w{i}", model_dir, roles[i] if roles else "both", dict(engine_cfg),
                        gpu=gpus[i] if device == "cuda" else None) for i in range(n)]

    state_box = {}
    next_id = [n]

    def spawn(role: str) -> str | None:
        """Start one more worker process for the planner (on CUDA on a GPU no live worker holds)."""
        gpu = None
        if device == "cuda":
            busy = {runtime.specs[w].gpu for w, p in runtime.procs.items() if p.poll() is None}
            free = [g for g in gpus if g not in busy]
            if not free:
                return None
            gpu = free[0]
        wid = f"w{next_id[0]}"
        next_id[0] += 1
        client.expect_worker(wid, role)
        runtime.start_worker(WorkerSpec(wid, model_dir, role, dict(engine_cfg), gpu=gpu))
        return wid

    async def on_startup():
        for s in specs:
            client.expect_worker(s.worker_id, s.role)
            runtime.start_worker(s)
        if args.planner:
            from tandem.frontend.planning import ServerPlanner
            sp = ServerPlanner(client, args.planner_profile, _planner_config(args, engine_cfg),
                               window_s=args.planner_window_s, spawn=spawn, terminate=runtime.stop_worker)
            state_box["state"].extra["planner"] = sp
            sp.start()
        asyncio.get_running_loop().create_task(_announce(state_box["state"], args, n))

    aliases = tuple({args.model, model_dir} - {None, served})
    cfg = ServerConfig(model_dir=model_dir, served_model_name=served, model_aliases=aliases, api_key=args.api_key,
                       max_waiting=args.max_waiting,
                       planner={"enabled": False, "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                                "decisions": []},
                       extra_info={"device": device, "engine_config": engine_cfg})
    state = ServerState(cfg, client, runtime, on_startup=on_startup)
    state_box["state"] = state
    app = create_app(state)
    return app, state, runtime


async def _announce(state, args, n: int) -> None:
    ok = await state.client.wait_ready(n, timeout=args.worker_ready_timeout)
    alive = len(state.client.alive_workers())
    if ok:
        msg = (f"tandem: serving {state.config.served_model_name!r} on http://{args.host}:{args.port} "
               f"with {alive} worker(s)")
    else:
        errs = "; ".join(f"{w.worker_id}: {w.error}" for w in state.client.workers.values() if w.error)
        msg = f"tandem: only {alive}/{n} worker(s) ready on http://{args.host}:{args.port}" + (f" ({errs})" if errs else "")
        if alive == 0:
            msg = "tandem: no worker could start, shutting down" + (f" ({errs})" if errs else "")
            server = state.extra.get("uvicorn")
            if server is not None:
                state.extra["exit_code"] = 1
                server.should_exit = True
    print(msg, file=sys.stderr, flush=True)


def cmd_serve(args) -> int:
    import uvicorn
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, state, runtime = build_server(args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            access_log=level == "DEBUG", timeout_graceful_shutdown=3, lifespan="on")
    server = uvicorn.Server(config)
    state.extra["uvicorn"] = server
    from tandem.common.gcutil import freeze_startup_objects
    freeze_startup_objects()      # the app, routes and imports are long-lived: keep them out of GC walks
    try:
        server.run()
    finally:
        runtime.shutdown()
    return state.extra.get("exit_code", 0) if server.started else 1


# ============================================================================ other commands
def _add_model(sub) -> None:
    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_cmd", metavar="{init}")
    msub.required = True
    from tandem.model.init import add_model_init_arguments
    add_model_init_arguments(msub.add_parser("init", help="write a random-weight model in HF format"))


def _add_placeholder(sub, name: str, help: str) -> None:
    p = sub.add_parser(name, help=f"{help} (not implemented yet)", add_help=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _add_bench(sub) -> bool:
    try:
        from tandem.bench import cli as bench_cli
    except Exception:  # noqa: BLE001 - a broken optional command must not break `tandem serve`
        _add_placeholder(sub, "bench", "benchmark an OpenAI-compatible server")
        return False
    bench_cli.add_parser(sub)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: LLM serving with prefill/decode pools")
    try:
        from tandem import __version__
    except ImportError:  # pragma: no cover
        __version__ = "?"
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="{serve,model,bench,profile,sim}")
    sub.required = True
    add_serve_arguments(sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                       description="Serve a model over an OpenAI-compatible HTTP API."))
    _add_model(sub)
    parser._tandem_bench = _add_bench(sub)   # type: ignore[attr-defined]
    for name, h in (("profile", "measure a perf profile on a GPU"), ("sim", "simulate a cluster in virtual time")):
        if not _try_add_external(sub, name):
            _add_placeholder(sub, name, h)
    return parser


def _try_add_external(sub, name: str) -> bool:
    """Use tandem.<name>.cli's add_parser/run when that module exists (profile, sim)."""
    mod = _external(name)
    if mod is None:
        return False
    mod.add_parser(sub)
    return True


def _external(name: str):
    import importlib
    try:
        mod = importlib.import_module(f"tandem.{name}.cli")
    except Exception:  # noqa: BLE001
        return None
    return mod if hasattr(mod, "add_parser") and hasattr(mod, "run") else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from tandem.common.errors import TandemError
    try:
        if args.cmd == "serve":
            return cmd_serve(args)
        if args.cmd == "model":
            from tandem.model.init import run_model_init
            return run_model_init(args)
        if args.cmd == "bench":
            if not parser._tandem_bench:   # type: ignore[attr-defined]
                print("tandem bench: not available (tandem.bench is not installed)", file=sys.stderr)
                return EXIT_USAGE
            from tandem.bench import cli as bench_cli
            return int(bench_cli.run(args) or 0)
        if args.cmd in ("profile", "sim"):
            mod = _external(args.cmd)
            if mod is None:
                print(f"tandem {args.cmd}: not implemented yet", file=sys.stderr)
                return EXIT_USAGE
            return int(mod.run(args) or 0)
    except CLIError as e:
        print(f"tandem {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TandemError as e:
        print(f"tandem {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.cmd!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
