"""Model presets and `tandem model init` (random-weight HF-format model directories).

`init_model` imports torch lazily, so `tandem.model.presets` stays torch-free.
"""
from tandem.model.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "get_preset", "init_model", "main_model_init"]


def __getattr__(name):
    if name in ("init_model", "main_model_init"):
        from tandem.model import init
        return getattr(init, name)
    raise AttributeError(name)
