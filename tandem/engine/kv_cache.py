"""Paged KV cache bookkeeping: a block pool with ref counts, a prefix cache keyed by chained block
hashes, and LRU reuse of free cached blocks. Pure Python (no torch): the tensors live in the runner.

A block is in exactly one of three states: in use (ref_cnt > 0), free-and-cached (ref_cnt == 0, has a
hash, revivable by a prefix hit until evicted), free-and-empty. Free blocks sit in one LRU queue;
allocation takes the oldest, evicting its hash if it had one. Blocks are array entries, not objects
(the simulator holds a pool per simulated GPU: 1,000 pools of 26k blocks).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from tandem.common.errors import ContextTooLong, InvalidParams
from tandem.common.hashing import ROOT_HASH, hash_block


class Block:
    """A read-only snapshot of one block's state (`BlockPool.blocks`); the pool itself keeps arrays."""
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int, ref_cnt: int = 0, block_hash: int | None = None):
        self.block_id = block_id
        self.ref_cnt = ref_cnt
        self.block_hash = block_hash

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_cnt={self.ref_cnt}, block_hash={self.block_hash})"


class BlockPool:
    """Array-backed: a ref-count list and a dict of hashed blocks, no object per block, so that a
    pool of 100k blocks costs a few hundred KB and allocate/release of n blocks are list slices plus
    one loop. The free queue (allocation takes its front) is kept in three parts, in queue order:
    `_stack` (blocks released without a hash, which go to the front: its top is the front),
    `_fresh..num_blocks` (never allocated, in id order), `_lru` (blocks released with a hash, oldest
    first). That is exactly the order of a single LRU queue where hashless releases go to the front
    and hashed ones to the back, since fresh blocks only leave from the front of their run."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        # Without prefix caching no block is ever shared or hashed: ref counts are 0/1 and implied by
        # the free queue, so release/allocate are list slices (the simulator's common case).
        self._ref = [0] * num_blocks if enable_prefix_caching else None
        self._hash: dict[int, int] = {}             # block id -> its hash (blocks holding one)
        self._stack: list[int] = []
        self._fresh = 0
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._lru_nohash = 0                        # blocks in _lru whose hash reset_prefix_cache dropped
        self._nfree = num_blocks
        self.cached: dict[int, int] = {}            # block hash -> block id
        self.events_stored: list[int] = []
        self.events_removed: list[int] = []

    # -- queries
    @property
    def num_free(self) -> int:
        return self._nfree

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._nfree

    @property
    def num_cached_free(self) -> int:
        """O(1): the worker reads it every status tick (100 ms); counting the LRU took ~10 ms per tick once
        ~100k blocks were cached (GPU run 2 of 2026-11-23: periodic 10 ms decode stalls)."""
        return len(self._lru) - self._lru_nohash

    @property
    def free(self) -> list[int]:
        """Free block ids in allocation order (a copy; for tests and introspection)."""
        return self._stack[::-1] + list(range(self._fresh, self.num_blocks)) + list(self._lru)

    @property
    def blocks(self) -> list[Block]:
        """A snapshot of every block's state (for tests and introspection)."""
        h = self._hash
        ref = self._ref
        if ref is None:
            ref = [1] * self.num_blocks
            for b in self.free:
                ref[b] = 0
        return [Block(i, r, h.get(i)) for i, r in enumerate(ref)]

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes` (not yet referenced)."""
        out: list[int] = []
        if not self.enable_prefix_caching:
            return out
        cached = self.cached
        for h in hashes:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    # -- mutations
    def allocate(self, n: int) -> list[int]:
        if n > self._nfree:
            raise MemoryError(f"need {n} KV blocks, {self._nfree} free")
        if n <= 0:
            return []
        self._nfree -= n
        st = self._stack
        k = len(st)
        if n <= k:
            out = st[k - n:]
            del st[k - n:]
            out.reverse()
        else:
            out = st[::-1]
            st.clear()
            m = n - k
            f = self._fresh
            nf = min(m, self.num_blocks - f)
            if nf:
                out.extend(range(f, f + nf))
                self._fresh = f + nf
                m -= nf
            if m:                                   # the oldest free cached blocks: evict
                lru, hs = self._lru, self._hash
                for _ in range(m):
                    bid, _ = lru.popitem(last=False)
                    if bid in hs:
                        self._uncache(bid)
                    else:
                        self._lru_nohash -= 1
                    out.append(bid)
        ref = self._ref
        if ref is not None:
            for bid in out:
                ref[bid] = 1
        return out

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks found by `lookup` (reviving free cached ones)."""
        ref = self._ref
        if ref is None:
            if block_ids:
                raise ValueError("touch: blocks are only shared with prefix caching on")
            return
        for bid in block_ids:
            r = ref[bid]
            if r == 0:
                del self._lru[bid]                  # a free block with a hash is always in _lru
                self._nfree -= 1
            ref[bid] = r + 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block. Pass a request's table tail-first, so its last blocks
        (least likely to be shared) are evicted first; blocks without a hash go to the front."""
        ref, hs, push = self._ref, self._hash, self._stack.append
        if ref is None:
            if self._nfree + len(block_ids) > self.num_blocks:
                raise AssertionError(f"double free: {len(block_ids)} blocks released, "
                                     f"{self.num_blocks - self._nfree} in use")
            self._stack.extend(block_ids)
            self._nfree += len(block_ids)
            return
        freed = 0
        for bid in block_ids:
            r = ref[bid] - 1
            if r < 0:
                raise AssertionError(f"double free of block {bid}")
            ref[bid] = r
            if r == 0:
                freed += 1
                if bid in hs:
                    self._lru[bid] = None
                else:
                    push(bid)
        self._nfree += freed

    def cache(self, block_id: int, block_hash: int) -> None:
        """Publish a full, computed block under its chained hash (first writer wins). Only blocks in
        use are computed, so a free block is never published."""
        if self._ref is None or self._ref[block_id] == 0:
            return
        if block_id in self._hash or block_hash in self.cached:
            return
        self._hash[block_id] = block_hash
        self.cached[block_hash] = block_id
        self.events_stored.append(block_hash)

    def _uncache(self, block_id: int) -> None:
        h = self._hash.pop(block_id)
        if self.cached.get(h) == block_id:
            del self.cached[h]
            self.events_removed.append(h)

    def drain_events(self) -> tuple[list[int], list[int]]:
        s, r = self.events_stored, self.events_removed
        self.events_stored, self.events_removed = [], []
        return s, r

    def reset_prefix_cache(self) -> None:
        for bid in list(self._lru):
            if bid in self._hash:
                self._uncache(bid)
                self._lru_nohash += 1


class KVCacheManager:
    """Per-request block tables on top of a BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def prefix_hashes(self, req, upto_tokens: int) -> Sequence[int]:
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
        if not self.pool.enable_prefix_caching:    # nothing is ever cached: no hashes to compute
            req.block_table = []
            return 0
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        hits = self.pool.lookup(self.prefix_hashes(req, max_blocks * self.block_size))
        self.pool.touch(hits)
        req.block_table = list(hits)
        return len(hits) * self.block_size

    def count_prefix_hit(self, token_ids: Sequence[int], hashes: Sequence[int] | None = None) -> int:
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
        self.pool.release(req.block_table[::-1])
        req.block_table = []
        req.num_cached_blocks = 0


def import_kv_blocks(kv: KVCacheManager, req, num_tokens: int, block_size: int, start_block: int,
                     write=None) -> None:
    """Take imported KV (`num_tokens` tokens held from block `start_block` on) for `req`: blocks already
    cached here are reused, the rest allocated and handed to `write(new_blocks, src_slice)` (the real engine
    copies the data; the simulator has none). When they do not fit, req's blocks are freed and it is
    prefilled here instead (nothing lost). Shared by `Engine` and `SimEngine` so both adopt alike."""
    if block_size != kv.block_size:
        raise InvalidParams("KV import with a different block size")
    n = min(num_tokens, req.num_tokens - 1)         # leave >= 1 token to compute
    hit = kv.match_prefix(req)                      # blocks already held here need no copy
    hit_blocks = min(hit, n) // kv.block_size
    extra = req.block_table[hit_blocks:]
    if extra:
        kv.pool.release(list(reversed(extra)))
        del req.block_table[hit_blocks:]
    need_blocks = kv.blocks_needed(n)
    if hit_blocks < start_block or need_blocks - hit_blocks > kv.pool.num_free:
        kv.free(req)                                # cannot use it: recompute instead
        return
    new = kv.pool.allocate(need_blocks - hit_blocks)
    if write is not None:
        write(new, slice(hit_blocks - start_block, need_blocks - start_block))
    req.block_table.extend(new)
    req.num_computed_tokens = n
    req.num_cached_tokens = min(n, req.num_prompt_tokens)
    kv.cache_full_blocks(req)


def check_request_fits(kv: KVCacheManager, n_prompt: int, max_tokens: int, n_out: int, max_model_len: int) -> None:
    """Reject at admission a request that could never run: longer than the model's context, or needing
    more KV blocks than the worker has. Shared by `Engine` and `SimEngine`, so both refuse alike."""
    total = n_prompt + max_tokens
    if n_prompt + n_out >= max_model_len or total > max_model_len:
        raise ContextTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{total} tokens ({n_prompt} in the prompt, {max_tokens} for the completion).", "messages")
    if kv.blocks_needed(total) > kv.pool.num_blocks:
        raise ContextTooLong(f"request needs {total} tokens of KV cache but this worker holds only "
                             f"{kv.pool.num_blocks * kv.block_size}", "max_tokens")
