"""The array-backed BlockPool makes exactly the choices of the original one-object-per-block pool
with a single OrderedDict LRU queue (kept here as the reference): same block ids from every
allocate, same free order, same prefix-cache contents and KV events, under random operations."""
import random
from collections import OrderedDict

import pytest

from tandem.engine.kv_cache import BlockPool


class _RefPool:
    """The pool as it was before it became array-backed (commit c430fc3), trimmed to its logic."""

    def __init__(self, n: int):
        self.ref = [0] * n
        self.hash: list = [None] * n
        self.free = OrderedDict((i, None) for i in range(n))
        self.cached: dict[int, int] = {}
        self.stored: list[int] = []
        self.removed: list[int] = []

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError
        out = []
        for _ in range(n):
            bid, _ = self.free.popitem(last=False)
            if self.hash[bid] is not None:
                self._uncache(bid)
            self.ref[bid] = 1
            out.append(bid)
        return out

    def touch(self, ids: list[int]) -> None:
        for bid in ids:
            if self.ref[bid] == 0:
                del self.free[bid]
            self.ref[bid] += 1

    def release(self, ids: list[int]) -> None:
        for bid in ids:
            self.ref[bid] -= 1
            if self.ref[bid] == 0:
                self.free[bid] = None
                if self.hash[bid] is None:
                    self.free.move_to_end(bid, last=False)

    def cache(self, bid: int, h: int) -> None:
        if self.hash[bid] is not None or h in self.cached:
            return
        self.hash[bid] = h
        self.cached[h] = bid
        self.stored.append(h)

    def _uncache(self, bid: int) -> None:
        h = self.hash[bid]
        if self.cached.get(h) == bid:
            del self.cached[h]
            self.removed.append(h)
        self.hash[bid] = None

    def lookup(self, hashes: list[int]) -> list[int]:
        out = []
        for h in hashes:
            if h not in self.cached:
                break
            out.append(self.cached[h])
        return out

    def reset(self) -> None:
        for bid in list(self.free):
            if self.hash[bid] is not None:
                self._uncache(bid)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_same_choices_as_reference_pool(seed, caching):
    rng = random.Random(seed)
    n = rng.choice([8, 32, 200])
    new, ref = BlockPool(n, enable_prefix_caching=caching), _RefPool(n)
    tables: list[list[int]] = []              # blocks held, one list per "request"
    for _ in range(400):
        op = rng.random()
        if op < 0.35:
            k = rng.randint(0, max(0, min(n, new.num_free) // 2 + 1))
            if k > new.num_free:
                with pytest.raises(MemoryError):
                    new.allocate(k)
                continue
            a, b = new.allocate(k), ref.allocate(k)
            assert a == b
            tables.append(a)
        elif op < 0.6 and tables:
            t = tables.pop(rng.randrange(len(tables)))
            new.release(list(reversed(t)))
            ref.release(list(reversed(t)))
        elif op < 0.8 and tables and caching:
            t = rng.choice(tables)
            for bid in t[:rng.randint(0, len(t))]:
                h = rng.randrange(3 * n)              # collisions: first writer wins
                new.cache(bid, h)
                ref.cache(bid, h)
        elif op < 0.95 and caching:
            hs = [rng.randrange(3 * n) for _ in range(rng.randint(1, 6))]
            got = new.lookup(hs)
            assert got == ref.lookup(hs)
            new.touch(got)
            ref.touch(got)
            tables.append(got)
        else:
            new.reset_prefix_cache()
            ref.reset()
        assert new.free == list(ref.free)
        assert new.cached == ref.cached
        assert [b.ref_cnt for b in new.blocks] == ref.ref
        assert [b.block_hash for b in new.blocks] == ref.hash
        s, r = new.drain_events()
        assert (s, r) == (ref.stored, ref.removed)
        ref.stored, ref.removed = [], []
        assert new.num_cached_free == sum(1 for b in ref.free if ref.hash[b] is not None)
    for t in tables:
        new.release(t)
    assert new.num_free == n


@pytest.mark.parametrize("caching", [True, False])
def test_double_free_and_free_block_not_published(caching):
    p = BlockPool(4, enable_prefix_caching=caching)
    a = p.allocate(2)
    p.release(a)
    with pytest.raises(AssertionError, match="double free"):
        p.release(a + a[:1])
    p.cache(a[0], 123)                 # free: never computed, so never published
    assert p.cached == {} and p.drain_events() == ([], [])


def test_large_pools_are_cheap():
    """1,000 simulated GPUs hold 1,000 pools: creating one must not build an object per block."""
    import time
    t = time.process_time()
    pools = [BlockPool(100_000) for _ in range(50)]
    assert time.process_time() - t < 2.0
    assert sum(p.num_free for p in pools) == 5_000_000
