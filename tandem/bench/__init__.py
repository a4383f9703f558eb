"""`tandem bench`: open-loop trace/workload replay against OpenAI-compatible servers.

Torch-free. The pieces others use:
- `BenchRequest` (what to send), `RequestRecord` (what happened to one request),
- `build_report(config, records, timeline)` -> the report dict shared with `tandem sim`,
- `tandem.bench.cli.add_parser(subparsers)` / `tandem.bench.cli.run(args)` for the CLI.
"""
from tandem.bench.records import RequestRecord
from tandem.bench.report import build_report, load_report, write_report
from tandem.bench.traces import BenchRequest

__all__ = ["BenchRequest", "RequestRecord", "build_report", "load_report", "write_report"]
