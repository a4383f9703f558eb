"""Shared fixtures: tiny random-weight models in HF format, written once per test session.

`tiny_model_dir(name)` returns the directory of one of TINY_MODELS (created on first use);
`llama_dir`, `qwen2_dir`, `qwen3_dir`, `llama_rope_dir`, `llama_tied_dir` are shortcuts.
Norm weights are randomized (norm_std) so a mixed-up norm shows in the logits.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes them 10-50x slower when
# the CPU is shared (parallel test runs, other jobs). Must be set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# make `tests.<dir>.util` helpers importable however pytest is started
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_configure(config):
    """A compiled extension older than its source (tandem/compile.py) would test old code."""
    config.addinivalue_line("markers", "needs_source: monkeypatches a module that tandem.compile compiles; "
                            "skipped when compiled, run under TANDEM_PURE_PYTHON=1 by tests/sim/test_compiled.py")
    from tandem._compiled import stale
    old = stale()
    if old:
        raise pytest.UsageError(f"compiled {old} older than the source: run `make test` (or `python -m "
                                "tandem.compile`, or `python -m tandem.compile --clean` for pure Python)")


def pytest_collection_modifyitems(config, items):
    from tandem._compiled import compiled_modules
    if not compiled_modules():          # pure Python (TANDEM_PURE_PYTHON=1 included): they run as they are
        return
    skip = pytest.mark.skip(reason="monkeypatches a compiled module: tests/sim/test_compiled.py runs it as Python")
    for item in items:
        if "needs_source" in item.keywords:
            item.add_marker(skip)


LLAMA3_ROPE_SMALL = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 256}

# name -> (preset, config.json overrides)
TINY_MODELS = {
    "llama": ("tiny", None),
    "qwen2": ("tiny-qwen2", None),
    "qwen3": ("tiny-qwen3", None),
    "llama_rope": ("tiny", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE_SMALL}),
    "llama_tied": ("tiny", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tandem.model.init import init_model
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            preset, overrides = TINY_MODELS[name]
            d = tmp_path_factory.mktemp(f"model_{name}")
            init_model(d, preset, dtype="float32", seed=1234, device="cpu", overrides=overrides, norm_std=0.1)
            made[name] = str(d)
        return made[name]

    return get


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def qwen2_dir(tiny_model_dir):
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_dir):
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="session")
def llama_rope_dir(tiny_model_dir):
    return tiny_model_dir("llama_rope")


@pytest.fixture(scope="session")
def llama_tied_dir(tiny_model_dir):
    return tiny_model_dir("llama_tied")
