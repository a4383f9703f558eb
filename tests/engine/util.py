"""Test helpers: build AttnMetadata / KV caches by hand, run a model over a paged cache."""
from __future__ import annotations

import torch

from tandem.engine.attention import AttnMetadata


def make_meta(seq_lens: list[int], query_lens: list[int], block_tables: list[list[int]], block_size: int,
              device="cpu") -> AttnMetadata:
    """Metadata for a flattened batch: sequence i has seq_lens[i] tokens of context of which the last
    query_lens[i] are computed this step, stored in blocks block_tables[i]."""
    assert len(seq_lens) == len(query_lens) == len(block_tables)
    qsl = [0]
    slots: list[int] = []
    for sl, ql, bt in zip(seq_lens, query_lens, block_tables):
        assert 0 < ql <= sl and len(bt) * block_size >= sl, (sl, ql, bt)
        qsl.append(qsl[-1] + ql)
        for pos in range(sl - ql, sl):
            slots.append(bt[pos // block_size] * block_size + pos % block_size)
    max_blocks = max(len(bt) for bt in block_tables)
    padded = [bt + [0] * (max_blocks - len(bt)) for bt in block_tables]
    i32 = dict(dtype=torch.int32, device=device)
    return AttnMetadata(
        query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        block_tables=torch.tensor(padded, **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
        block_tables_cpu=[list(bt) for bt in block_tables],
    )


def positions_for(seq_lens: list[int], query_lens: list[int], device="cpu") -> torch.Tensor:
    pos = [p for sl, ql in zip(seq_lens, query_lens) for p in range(sl - ql, sl)]
    return torch.tensor(pos, dtype=torch.long, device=device)


def make_kv_cache(cfg, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.zeros(cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                       dtype=dtype, device=device)


class BlockAllocator:
    """Hands out distinct, deliberately non-contiguous block ids (so block-table bugs show)."""

    def __init__(self, num_blocks: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        assert len(out) == n, "out of blocks"
        return out


def step(model, kv, tokens_per_seq: list[list[int]], seq_lens: list[int], block_tables: list[list[int]],
         block_size: int) -> torch.Tensor:
    """One forward over several sequences: tokens_per_seq[i] are the last tokens of a context of seq_lens[i].
    Returns final hidden states [T, H]."""
    qlens = [len(t) for t in tokens_per_seq]
    ids = torch.tensor([t for ts in tokens_per_seq for t in ts], dtype=torch.long, device=kv.device)
    meta = make_meta(seq_lens, qlens, block_tables, block_size, device=kv.device)
    with torch.no_grad():
        return model(ids, positions_for(seq_lens, qlens, device=kv.device), kv, meta)
