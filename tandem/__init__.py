"""Tandem: LLM serving with disaggregated prefill/decode pools and a real-time planner.

`LLM` is imported lazily so that torch-free components (router, planner, bench, sim) can import
`tandem.*` without pulling in torch.
"""
from tandem.common.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":
        from tandem.engine.llm import LLM
        return LLM
    raise AttributeError(name)
