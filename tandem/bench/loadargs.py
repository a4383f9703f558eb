"""The load flags (`--trace`, `--workload`, `--rate`, ... `--max-concurrency`), one definition for
`tandem bench` and `tandem sim`: a sim run validates a bench run by repeating its load flags, so the
two must take the same flags with the same meaning."""
from __future__ import annotations

from tandem.bench import workloads as wl
from tandem.common.argtypes import nonneg as _nonneg
from tandem.common.argtypes import positive as _positive

OPEN_LOOP_HELP = "cap requests in flight (default: none, pure open loop)"


def add_load_arguments(g, *, required: bool = False, max_concurrency_help: str = OPEN_LOOP_HELP) -> None:
    """Add the load flags to argument group `g`; `required`: one of --trace / --workload must be given."""
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--trace", action="append", metavar="FILE[#CLASS[:PRIORITY]]",
                     help="Azure 2023 CSV or Mooncake/generic JSONL; repeat to merge traces as classes")
    src.add_argument("--workload", help=f"synthetic workload: {', '.join(wl.WORKLOADS)}")
    g.add_argument("--wl", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="workload parameter (see tandem.bench.workloads.WorkloadParams), e.g. chat_isl=128")
    g.add_argument("--rate", type=_positive(float), default=None,
                   help="requests/s: the workload's rate, or re-time a trace with synthetic arrivals")
    g.add_argument("--arrival", choices=("poisson", "gamma", "constant"), default=None,
                   help="arrival process for --rate (default poisson)")
    g.add_argument("--cv", type=_positive(float), default=None, help="inter-arrival CV for --arrival gamma")
    g.add_argument("--time-scale", type=_positive(float), default=1.0,
                   help="multiply trace timestamps by S (0.5 replays twice as fast)")
    g.add_argument("--trace-start", type=_nonneg(float), default=0.0, help="skip the first S trace seconds")
    g.add_argument("--jitter", default="auto",
                   help="add U[0,J) trace seconds to each arrival; 'auto' = the tick size when a trace's "
                        "timestamps are quantized (Mooncake: ~3 s), else 0")
    g.add_argument("--duration", type=_positive(float), default=None,
                   help="send arrivals of the first S seconds (after --time-scale); workloads default to 60")
    g.add_argument("--max-requests", type=_positive(int), default=None, help="send at most N requests")
    g.add_argument("--max-isl", type=_positive(int), default=None, help="cap prompt length (tokens)")
    g.add_argument("--max-osl", type=_positive(int), default=None, help="cap output length (tokens)")
    g.add_argument("--classify", choices=("none", "shape"), default="none",
                   help="shape: split trace rows into chat (interactive) and summarize (batch) by isl/osl")
    g.add_argument("--shape-ratio", type=_positive(float), default=4.0,
                   help="with --classify shape: isl >= R*osl is summarize")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-concurrency", type=_positive(int), default=None,
                   help=max_concurrency_help)
