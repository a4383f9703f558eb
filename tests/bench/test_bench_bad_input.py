"""Bad input gives a clear message and a non-zero exit code."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.bench.cli import EXIT_BAD_INPUT, EXIT_SERVER, build_parser, run

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(argv):
    return run(build_parser().parse_args([str(a) for a in argv]))


DEAD_URL = "http://127.0.0.1:9"     # discard port: nothing listens


@pytest.mark.parametrize("trace,match", [
    ("missing.csv", "trace file not found"),
    ("dir", "is a directory"),
    ("garbage.csv", "not an Azure trace CSV"),
    ("garbage.jsonl", "bad record"),
    ("binary.bin", "not UTF-8"),
])
def test_unreadable_trace(tmp_path, capsys, trace, match):
    (tmp_path / "dir").mkdir()
    (tmp_path / "garbage.csv").write_text("hello,world\n1,2\n")
    (tmp_path / "garbage.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "binary.bin").write_bytes(bytes(range(128, 256)) * 10)
    rc = bench(["--url", DEAD_URL, "--trace", tmp_path / trace, "--out", tmp_path / "o.json"])
    assert rc == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "error:" in err and match in " ".join(err.split())
    assert not (tmp_path / "o.json").exists()


def test_unknown_workload(tmp_path, capsys):
    rc = bench(["--url", DEAD_URL, "--workload", "chitchat", "--out", tmp_path / "o.json"])
    assert rc == EXIT_BAD_INPUT
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown workload 'chitchat'" in err and "chat, summarize, mixed, bursty" in err


@pytest.mark.parametrize("extra,match", [
    (["--wl", "nope=1"], "unknown workload parameter"),
    (["--slo", "chat:100"], "CLASS:TTFT_MS:TPOT_MS"),
    (["--extra-body", "{bad"], "not valid JSON"),
    (["--endpoint", "chat", "--prompt-mode", "ids"], "--prompt-mode text"),
    (["--tokenizer", "/nonexistent/tok"], "no tokenizer.json"),
    (["--token-range", "a:b"], "LO:HI"),
])
def test_bad_options(tmp_path, capsys, extra, match):
    rc = bench(["--url", DEAD_URL, "--workload", "chat", "--out", tmp_path / "o.json", *extra])
    assert rc == EXIT_BAD_INPUT
    assert match in " ".join(capsys.readouterr().err.split())


def test_unreachable_url(tmp_path, capsys):
    port = free_port()
    rc = bench(["--url", f"http://127.0.0.1:{port}", "--workload", "chat", "--max-requests", "2",
                "--out", tmp_path / "o.json"])
    assert rc == EXIT_SERVER
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot reach http://127.0.0.1:{port}" in err and "connection refused" in err
    assert not (tmp_path / "o.json").exists()


def test_module_entry_point_and_argparse_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "tandem.bench", "--url", DEAD_URL, "--workload", "nope",
                        "--out", str(tmp_path / "o.json"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode == EXIT_BAD_INPUT and "unknown workload 'nope'" in p.stderr
    # both sources, or none, are argparse errors (exit 2 with usage)
    p = subprocess.run([sys.executable, "-m", "tandem.bench", "--url", DEAD_URL, "--workload", "chat",
                        "--trace", "x.csv", "--out", "o.json"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=60)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr
    p = subprocess.run([sys.executable, "-m", "tandem.bench", "--url", DEAD_URL, "--workload", "chat",
                        "--rate", "-3", "--out", "o.json"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=60)
    assert p.returncode == 2 and "must be > 0" in p.stderr


def test_add_parser_wiring(tmp_path):
    import argparse

    from tandem.bench import cli
    top = argparse.ArgumentParser(prog="tandem")
    sub = top.add_subparsers(dest="cmd")
    cli.add_parser(sub)
    args = top.parse_args(["bench", "--url", DEAD_URL, "--workload", "chat", "--max-requests", "3",
                           "--out", str(tmp_path / "o.json"), "--dry-run"])
    assert args.func is cli.run
    assert cli.run(args) == 0


def test_no_torch_import():
    code = ("import sys, tandem.bench.cli, tandem.bench.plots, tandem.bench.stub, tandem.bench.client;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)


def test_missing_required_options(tmp_path, capsys):
    assert bench(["--workload", "chat", "--out", tmp_path / "o.json"]) == EXIT_BAD_INPUT
    assert "missing --url" in capsys.readouterr().err
    assert bench(["--url", DEAD_URL, "--workload", "chat"]) == EXIT_BAD_INPUT
    assert "missing --out" in capsys.readouterr().err
    assert bench(["--url", DEAD_URL, "--out", tmp_path / "o.json"]) == EXIT_BAD_INPUT
    assert "--trace FILE or --workload NAME" in capsys.readouterr().err


def test_compare_reports(tmp_path, capsys):
    from tandem.bench import RequestRecord, build_report, write_report

    def rep(scale, label):
        recs = [RequestRecord(arrival_s=0.1 * i, cls=c, priority="interactive", isl=10, osl_requested=3,
                              output_tokens=3, ttft_s=0.05 * scale, token_times_s=[0.05 * scale, 0.06 * scale,
                                                                                   0.07 * scale],
                              e2e_s=0.08 * scale) for i, c in enumerate(["chat", "summarize"] * 5)]
        return build_report({"label": label, "slo_ttft_ms": 60}, recs, [])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_report(str(a), rep(1.0, "tandem"))
    write_report(str(b), rep(2.0, "vllm"))
    assert bench(["--compare", a, b, "--plot", tmp_path / "cmp"]) == 0
    out = capsys.readouterr().out
    assert "tandem (base)" in out and "vllm" in out and "+100%" in out and "summarize" in out
    assert (tmp_path / "cmp" / "compare_cdf.png").stat().st_size > 10_000
    (tmp_path / "bad.json").write_text("{}")
    assert bench(["--compare", a, tmp_path / "bad.json"]) == EXIT_BAD_INPUT
    assert "not a readable tandem report" in capsys.readouterr().err
    assert bench(["--compare", a]) == EXIT_BAD_INPUT


def test_save_outputs_names_what_failed(tmp_path):
    """The shared output step of bench and sim: an unwritable --out / --plot is an OutputError saying which."""
    from tandem.bench.report import OutputError, save_outputs
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*a_file/r\.json"):
        save_outputs({"x": 1}, str(blocker / "r.json"), None)
    assert save_outputs({"x": 1}, str(tmp_path / "r.json"), None) == []
    assert (tmp_path / "r.json").read_text() == '{"x":1}\n'
    with pytest.raises(OutputError, match="cannot write plots to"):
        save_outputs({"x": 1}, str(tmp_path / "r2.json"), str(blocker / "plots"))
