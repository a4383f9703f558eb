"""argparse `type=` checkers shared by the CLIs (`tandem bench`, `tandem sim`), so that the same
flag rejects the same input with the same message in both."""
from __future__ import annotations

import argparse
from typing import Callable


def _checked(kind: Callable, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    def f(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {s}")
        return v
    return f


def positive(kind: Callable) -> Callable[[str], float]:
    """`kind(s)` > 0 (kind: int or float)."""
    return _checked(kind, lambda v: v > 0, "> 0")


def nonneg(kind: Callable) -> Callable[[str], float]:
    """`kind(s)` >= 0 (kind: int or float)."""
    return _checked(kind, lambda v: v >= 0, ">= 0")
