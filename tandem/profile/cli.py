"""`tandem profile --model DIR --out PROFILE.json`: measure a model on this GPU for the planner/sim.

The CLI author wires `add_parser(subparsers)` / `run(args)` into `tandem`; `python -m tandem.profile`
works on its own.
"""
from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="HF-format model directory")
    p.add_argument("--out", required=True, help="where to write the profile JSON")
    p.add_argument("--preset", default=None, help="preset name to record (informational)")
    p.add_argument("--quick", action="store_true", help="fewer points (about a third of the time)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="measure a model's step times on this GPU (for planner and sim)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("tandem profile: torch is required", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("tandem profile: needs a CUDA GPU (profiles describe GPU step times)", file=sys.stderr)
        return 2
    from tandem.profile.profiler import profile_model
    command = getattr(args, "command_line", None) or "tandem profile " + " ".join(
        shlex.quote(a) for a in ["--model", args.model, "--out", args.out]
        + (["--preset", args.preset] if args.preset else []) + (["--quick"] if args.quick else []))
    prof = profile_model(args.model, args.out, preset=args.preset, quick=args.quick, command=command,
                         log=lambda s: print(s, file=sys.stderr, flush=True), block_size=args.block_size,
                         gpu_memory_utilization=args.gpu_memory_utilization)
    print(f"wrote {args.out}: knee {prof.max_num_batched_tokens} tokens, KV {prof.kv_capacity_tokens} tokens, "
          f"decode b=1 {prof.decode_time(1, 1024) * 1e3:.2f} ms/step")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="tandem profile", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    args = p.parse_args(argv)
    args.command_line = "python -m tandem.profile " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    return run(args)
