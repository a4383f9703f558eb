"""Tandem: LLM serving with disaggregated prefill/decode pools and a real-time planner.

`LLM` is imported lazily so that torch-free components (router, planner, bench, sim) can import
`tandem.*` without pulling in torch.
"""
from tandem.common.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def _check_compiled() -> None:
    """`python -m tandem.compile` builds C extensions beside some sources: `TANDEM_PURE_PYTHON=1` ignores
    them, and one older than its source (it would silently run old code) is warned about."""
    import os

    from tandem._compiled import prefer_source, stale
    if os.environ.get("TANDEM_PURE_PYTHON", "") not in ("", "0"):
        prefer_source()
        return
    mods = stale()
    if mods:
        import warnings
        warnings.warn(f"compiled {', '.join(mods)} older than the source and imported instead of it: "
                      "run `python -m tandem.compile` (or `python -m tandem.compile --clean`)", RuntimeWarning,
                      stacklevel=2)


_check_compiled()


def __getattr__(name):
    if name == "LLM":
        from tandem.engine.llm import LLM
        return LLM
    raise AttributeError(name)
