"""Paged KV cache bookkeeping: a block pool with ref counts, a prefix cache keyed by chained block
hashes, and LRU reuse of free cached blocks. Pure Python (no torch): the tensors live in the runner.

A block is in exactly one of three states: in use (ref_cnt > 0), free-and-cached (ref_cnt == 0, has a
hash, revivable by a prefix hit until evicted), free-and-empty. Free blocks sit in one LRU queue;
allocation takes the oldest, evicting its hash if it had one.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tandem.common.hashing import ROOT_HASH, hash_block


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}            # block hash -> block id
        self.events_stored: list[int] = []
        self.events_removed: list[int] = []

    # -- queries
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached_free(self) -> int:
        return sum(1 for b in self.free if self.blocks[b].block_hash is not None)

    def lookup(self, hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes` (not yet referenced)."""
        out = []
        if not self.enable_prefix_caching:
            return out
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    # -- mutations
    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"need {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                self._uncache(blk)
            blk.ref_cnt = 1
            out.append(bid)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on blocks found by `lookup` (reviving free cached ones)."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_cnt == 0:
                del self.free[bid]
            blk.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Pass a request's table tail-first, so its last blocks
        (least likely to be shared) are evicted first; blocks without a hash go to the front."""
        for bid in block_ids:
            blk = self.blocks[bid]
            assert blk.ref_cnt > 0, f"double free of block {bid}"
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self.free[bid] = None
                if blk.block_hash is None:
                    self.free.move_to_end(bid, last=False)

    def cache(self, block_id: int, block_hash: int) -> None:
        """Publish a full, computed block under its chained hash (first writer wins)."""
        if not self.enable_prefix_caching:
            return
        blk = self.blocks[block_id]
        if blk.block_hash is not None or block_hash in self.cached:
            return
        blk.block_hash = block_hash
        self.cached[block_hash] = block_id
        self.events_stored.append(block_hash)

    def _uncache(self, blk: Block) -> None:
        if self.cached.get(blk.block_hash) == blk.block_id:
            del self.cached[blk.block_hash]
            self.events_removed.append(blk.block_hash)
        blk.block_hash = None

    def drain_events(self) -> tuple[list[int], list[int]]:
        s, r = self.events_stored, self.events_removed
        self.events_stored, self.events_removed = [], []
        return s, r

    def reset_prefix_cache(self) -> None:
        for bid in list(self.free):
            if self.blocks[bid].block_hash is not None:
                self._uncache(self.blocks[bid])


class KVCacheManager:
    """Per-request block tables on top of a BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def prefix_hashes(self, req, upto_tokens: int) -> list[int]:
        """Chained hashes of the request's full blocks within its first `upto_tokens` tokens (memoised)."""
        n_full = upto_tokens // self.block_size
        hs = req.block_hashes
        parent = hs[-1] if hs else ROOT_HASH
        toks = req.all_token_ids
        bs = self.block_size
        for b in range(len(hs), n_full):
            parent = hash_block(parent, toks[b * bs:(b + 1) * bs])
            hs.append(parent)
        return hs[:n_full]

    def match_prefix(self, req) -> int:
        """On first scheduling: take cached blocks for the longest cached prefix; returns tokens hit.
        At least one token is always left to compute (it yields the next-token logits)."""
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        hits = self.pool.lookup(self.prefix_hashes(req, max_blocks * self.block_size))
        self.pool.touch(hits)
        req.block_table = list(hits)
        return len(hits) * self.block_size

    def count_prefix_hit(self, token_ids: list[int], hashes: list[int] | None = None) -> int:
        """Tokens of `token_ids` already cached here (read-only; for routing and transfer dedup)."""
        from tandem.common.hashing import block_hashes
        hashes = hashes if hashes is not None else block_hashes(token_ids, self.block_size)
        return len(self.pool.lookup(hashes)) * self.block_size

    def allocate_slots(self, req, num_new_tokens: int) -> bool:
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_table.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, req) -> None:
        """Publish the request's blocks that are full and computed."""
        if not self.pool.enable_prefix_caching:
            return
        n_full = req.num_computed_tokens // self.block_size
        if n_full <= req.num_cached_blocks:
            return
        hashes = self.prefix_hashes(req, n_full * self.block_size)
        for b in range(req.num_cached_blocks, n_full):
            self.pool.cache(req.block_table[b], hashes[b])
        req.num_cached_blocks = n_full

    def free(self, req) -> None:
        self.pool.release(list(reversed(req.block_table)))
        req.block_table = []
        req.num_cached_blocks = 0
