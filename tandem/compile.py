"""Compile the simulator's hot path with mypyc, in place (optional; `make install` runs it).

`tandem sim` at cluster scale spends its time in plain-Python bookkeeping: the real scheduler, KV
block pool and request of the engine, the simulated engine, the cluster's event loop and the perf
profile. mypyc compiles those same sources (typed, checked by mypy) to C extensions that sit beside
them; Python imports an extension before its source, so nothing else changes. The simulated results
are identical, ~2x faster (docs/sim.md). Without mypyc or a C compiler everything runs as Python.

    python -m tandem.compile            # build (about a minute)
    python -m tandem.compile --status   # which modules are compiled
    python -m tandem.compile --clean    # back to pure Python

The shared runtime library goes inside the package (`tandem/_compiled__mypyc*.so`), so a console
script finds it whatever the working directory.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile

from tandem._compiled import GROUP, MODULES, ROOT, _path, compiled_modules


def _extensions() -> list[str]:
    """Compiled files of ours in the tree (the modules' and the shared library)."""
    out = []
    for mod in MODULES + (GROUP + "__mypyc",):
        base = os.path.join(ROOT, *mod.split("."))
        out += glob.glob(base + ".*.so") + glob.glob(base + ".*.pyd")
    return sorted(out)


def status() -> dict[str, bool]:
    """Module -> whether an import would load the compiled extension (not the source)."""
    done = set(compiled_modules())
    return {mod: mod in done for mod in MODULES}


def clean() -> int:
    files = _extensions()
    for f in files:
        os.remove(f)
    return len(files)


def build(quiet: bool = True) -> None:
    """mypyc-compile MODULES in place. Raises on failure (nothing half-built is left behind)."""
    from mypyc.build import mypycify
    from setuptools import setup

    clean()
    cwd = os.getcwd()
    tmp = tempfile.mkdtemp(prefix="tandem-mypyc-")
    try:
        os.chdir(ROOT)
        exts = mypycify([_path(m) for m in MODULES], opt_level="3", group_name=GROUP, target_dir=tmp)
        setup(name="tandem-compiled", ext_modules=exts, packages=[], py_modules=[],
              script_args=["-q" if quiet else "-v", "build_ext", "--inplace", "--build-temp", tmp])
    except BaseException:
        clean()
        raise
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tandem.compile", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--clean", action="store_true", help="remove the compiled extensions (pure Python)")
    g.add_argument("--status", action="store_true", help="print which modules are compiled")
    ap.add_argument("--optional", action="store_true",
                    help="on failure print a warning and exit 0 (the install goes on in pure Python)")
    a = ap.parse_args(argv)
    if a.clean:
        print(f"removed {clean()} compiled files")
        return 0
    if not a.status:
        try:
            build()
        except (Exception, SystemExit) as e:        # setuptools reports a failed compiler as SystemExit
            print(f"tandem.compile: not compiled ({type(e).__name__}: {e}); the simulator runs as plain Python",
                  file=sys.stderr)
            return 0 if a.optional else 1
    st = status()
    for mod, c in st.items():
        print(f"{'compiled' if c else 'python  '}  {mod}")
    return 0 if a.status or all(st.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
