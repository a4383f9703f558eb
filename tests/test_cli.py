"""`tandem` CLI: parsing, placeholders, model creation in the cache, serve argument checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem import cli

ROOT = Path(__file__).resolve().parents[1]


def test_serve_defaults_and_all_flags_parse():
    a = cli.build_parser().parse_args(["serve"])
    assert (a.host, a.port, a.model, a.workers, a.device, a.api_key is None or isinstance(a.api_key, str)) == \
        ("127.0.0.1", 8000, None, None, "auto", True)
    a = cli.build_parser().parse_args(
        ["serve", "--model", "tiny", "--workers", "2", "--slo-ttft-ms", "300", "--slo-tpot-ms", "40",
         "--host", "0.0.0.0", "--port", "9000", "--device", "cpu", "--max-num-seqs", "8",
         "--max-num-batched-tokens", "512", "--num-kv-blocks", "100", "--block-size", "16", "--dtype", "float32",
         "--api-key", "k", "--served-model-name", "m", "--router-mode", "least-loaded", "--max-model-len", "256"])
    cfg = cli._engine_config(a, "cpu", 2)
    assert cfg["max_num_seqs"] == 8 and cfg["num_kv_blocks"] == 100 and cfg["cpu_threads"] >= 1
    assert cfg["device"] == "cpu" and cfg["max_model_len"] == 256
    a = cli.build_parser().parse_args(["serve", "--prefill", "1", "--decode", "2", "--planner"])
    assert (a.prefill, a.decode, a.planner) == (1, 2, True)


@pytest.mark.parametrize("argv,needle", [
    (["serve", "--prefill", "1", "--decode", "0"], "--prefill >= 1 and --decode >= 1"),
    (["serve", "--prefill", "1", "--decode", "1", "--workers", "2"], "either --workers"),
    (["serve", "--planner"], "--planner needs disaggregated pools"),
    (["serve", "--prefill", "1", "--decode", "1", "--planner"], "--planner-profile"),
    (["serve", "--workers", "0"], "--workers"),
    (["serve", "--model", "/definitely/not/here"], "neither a model directory nor a preset"),
])
def test_serve_rejects_unsupported(argv, needle, capsys):
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("name", ["profile", "sim"])
def test_profile_and_sim_subcommands_are_wired(name):
    assert cli._external(name) is not None
    r = subprocess.run([sys.executable, "-m", "tandem.cli", name, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--out" in r.stdout, r.stderr


def test_python_dash_m_and_help():
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "serve" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--workers" in r.stdout and "--api-key" in r.stdout
    try:
        import tandem.bench.cli  # noqa: F401
    except Exception:  # noqa: BLE001
        return
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "bench", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--url" in r.stdout


def test_default_model_created_once_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    d, name = cli.resolve_model(None, "cpu")
    assert name == "tiny" and Path(d) == tmp_path / "models" / "tiny"
    assert (Path(d) / "config.json").is_file() and (Path(d) / "tokenizer.json").is_file()
    mtime = (Path(d) / "config.json").stat().st_mtime
    assert cli.resolve_model("tiny", "cpu")[0] == d
    assert (Path(d) / "config.json").stat().st_mtime == mtime          # not re-created
    # a directory works too, named after itself
    assert cli.resolve_model(d, "cpu") == (d, "tiny")


def test_model_init_command(tmp_path):
    out = tmp_path / "m"
    assert cli.main(["model", "init", str(out), "--preset", "tiny", "--device", "cpu"]) == 0
    assert (out / "model.safetensors").is_file()
    assert cli.main(["model", "init", str(tmp_path / "x"), "--preset", "nope"]) == 2


def test_serve_exits_when_no_worker_can_start(tmp_path, llama_dir):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--model", str(bad), "--port", "0",
                        "--log-level", "warning"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "no worker could start" in r.stderr


def test_serve_cuda_without_gpu(capsys, monkeypatch):
    monkeypatch.setattr(cli, "visible_gpus", lambda: [])
    assert cli.main(["serve", "--device", "cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err
