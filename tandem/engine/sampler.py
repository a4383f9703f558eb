"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs.

Random rows use the exponential-race trick (argmax of p / Exp(1)), with each row's noise drawn from
its own torch.Generator when it has a seed, so a seeded request gives the same tokens whatever it is
batched with.

`sample_ids` and `logprob_tensor` only queue GPU work (no host sync: small index tensors go through
pinned memory), so the engine can launch the next step before this one's results reach the host;
`logprob_dicts` turns the packed logprobs into per-token dicts once they are on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.hostcopy import to_device


@dataclass
class SampleRow:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    banned: list[int]          # token ids masked out (EOS / stop ids before min_tokens)
    logprobs: int | None


def sample_ids(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [n, V] float32 (modified in place) -> (token ids [n] long on the same device, and the raw
    log-softmax [n, V] when some row wants logprobs, else None). Queues work only; never syncs."""
    n, vocab = logits.shape
    dev = logits.device
    raw_lp = torch.log_softmax(logits, dim=-1) if any(r.logprobs is not None for r in rows) else None
    ban_rows = [i for i, r in enumerate(rows) for _ in r.banned]
    if ban_rows:
        idx = to_device([ban_rows, [t for r in rows for t in r.banned]], torch.long, dev)
        logits.index_put_((idx[0], idx[1]), torch.full((), float("-inf"), device=dev))
    rand = [i for i, r in enumerate(rows) if r.temperature > 0.0]
    if not rand:
        return logits.argmax(dim=-1), raw_lp
    every = len(rand) == n
    ridx = None if every else to_device(rand, torch.long, dev)
    x = logits if every else logits.index_select(0, ridx)
    x = x / to_device([rows[i].temperature for i in rand], torch.float32, dev)[:, None]
    x = _top_k_top_p(x, [rows[i].top_k for i in rand], [rows[i].top_p for i in rand])
    probs = torch.softmax(x, dim=-1)
    noise = torch.empty_like(probs)
    for j, i in enumerate(rand):
        g = rows[i].generator
        if g is not None and g.device != probs.device:
            noise[j] = torch.empty(vocab, device=g.device).exponential_(generator=g).to(dev, non_blocking=True)
        else:
            noise[j].exponential_(generator=g)
    picked = (probs / noise).argmax(dim=-1)
    if every:
        return picked, raw_lp
    return logits.argmax(dim=-1).index_copy_(0, ridx, picked), raw_lp


def logprob_tensor(raw_lp: torch.Tensor, rows: list[SampleRow], ids: torch.Tensor) -> torch.Tensor:
    """Per row, packed in one float32 tensor [n, 1 + 2k] (k = the most top logprobs any row wants): the
    sampled token's logprob, the top-k logprobs, then their token ids (exact in float32 below 2**24)."""
    k = max(r.logprobs or 0 for r in rows)
    chosen = raw_lp.gather(1, ids[:, None])
    if k == 0:
        return chosen
    v, i = raw_lp.topk(k, dim=-1)
    return torch.cat([chosen, v, i.float()], dim=1)


def logprob_dicts(packed: list[list[float]], rows: list[SampleRow], ids: list[int]) -> list[dict | None]:
    """Host side of `logprob_tensor`: {"token_id", "logprob", "top"} for rows that asked, else None."""
    lps: list[dict | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        if r.logprobs is None:
            continue
        row = packed[i]
        k = (len(row) - 1) // 2
        top = [[int(row[1 + k + j]), row[1 + j]] for j in range(r.logprobs)]
        lps[i] = {"token_id": ids[i], "logprob": row[0], "top": top}
    return lps


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return x
    sorted_x, idx = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    ks = to_device([k if k > 0 else vocab for k in top_k], torch.long, x.device)
    pos = torch.arange(vocab, device=x.device)[None, :]
    mask = pos >= ks[:, None]
    probs = torch.softmax(sorted_x.masked_fill(mask, float("-inf")), dim=-1)
    cum = probs.cumsum(dim=-1) - probs                      # mass strictly before each token
    mask |= cum >= to_device(top_p, torch.float32, x.device)[:, None]
    mask[:, 0] = False                                      # always keep the best token
    sorted_x = sorted_x.masked_fill(mask, float("-inf"))
    return torch.empty_like(x).scatter_(-1, idx, sorted_x)
