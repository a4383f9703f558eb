"""Chained block hashes: the one function both the engine's prefix cache and the router use.

Block i's hash covers its tokens and block i-1's hash, so equal hashes mean equal whole prefixes.
blake2b (not Python's salted `hash`) keeps hashes equal across processes and hosts.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

ROOT_HASH = 0


def hash_block(parent: int, tokens: Sequence[int], extra: int = 0) -> int:
    """Hash of one full block given its parent's hash; a non-negative int64 (msgpack-friendly)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little", signed=False))
    h.update(extra.to_bytes(8, "little", signed=False))
    h.update(array("i", tokens).tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH,
                 start_block: int = 0) -> list[int]:
    """Hashes of the full blocks of `token_ids` (a trailing partial block has none)."""
    out: list[int] = []
    n_full = len(token_ids) // block_size
    for b in range(start_block, n_full):
        parent = hash_block(parent, token_ids[b * block_size:(b + 1) * block_size])
        out.append(parent)
    return out
