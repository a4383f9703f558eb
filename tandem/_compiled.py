"""Which modules `python -m tandem.compile` compiles, and whether their extensions are stale (kept
import-light: `tandem/__init__` checks it on every import)."""
from __future__ import annotations

import os
from typing import Any

try:                                    # the class attribute mypyc reads (python -m tandem.compile)
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover
    def mypyc_attr(*_a: Any, **_kw: Any) -> Any:  # type: ignore[misc]
        return lambda cls: cls

MODULES = (
    "tandem.engine.request",
    "tandem.engine.kv_cache",
    "tandem.engine.scheduler",
    "tandem.engine.sim_engine",
    "tandem.sim.profile",
    "tandem.sim.cluster",
    "tandem.router.kv_router",
    "tandem.sim.fastrouter",
)
GROUP = "tandem._compiled"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the folder holding `tandem/`


def _path(mod: str) -> str:
    return os.path.join(*mod.split(".")) + ".py"


def compiled_modules() -> list[str]:
    """The modules of MODULES that run compiled: as loaded in this process, else as an import (or a
    forked domain process) would load them."""
    import importlib.util
    import sys

    def origin(m: str) -> str:
        mod = sys.modules.get(m)
        if mod is not None:
            return getattr(mod, "__file__", None) or ""
        spec = importlib.util.find_spec(m)
        return (spec.origin or "") if spec else ""
    return [m for m in MODULES if not origin(m).endswith(".py")]


def stale() -> list[str]:
    """Modules whose compiled extension is older than their source: an import would run old code."""
    from importlib.machinery import EXTENSION_SUFFIXES
    out = []
    for mod in MODULES:
        src = os.path.join(ROOT, _path(mod))
        for suf in EXTENSION_SUFFIXES:
            ext = src[:-3] + suf
            if os.path.exists(ext) and os.path.exists(src) and os.path.getmtime(ext) < os.path.getmtime(src):
                out.append(mod)
                break
    return out


def prefer_source() -> None:
    """Import our modules from source even where a compiled extension sits beside them
    (`TANDEM_PURE_PYTHON=1`; must run before they are imported): to compare or debug."""
    import sys
    from importlib.machinery import (BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES, ExtensionFileLoader,
                                     FileFinder, SourceFileLoader, SourcelessFileLoader)
    source_first = FileFinder.path_hook((SourceFileLoader, SOURCE_SUFFIXES),
                                        (SourcelessFileLoader, BYTECODE_SUFFIXES),
                                        (ExtensionFileLoader, EXTENSION_SUFFIXES))
    ours = os.path.join(ROOT, "tandem")

    def hook(path: str):
        p = os.path.abspath(path)
        if p != ours and not p.startswith(ours + os.sep):   # other packages keep their own loaders
            raise ImportError("not a tandem folder")
        return source_first(path)
    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()
