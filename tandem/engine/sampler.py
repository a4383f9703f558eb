"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs.

Random rows use the exponential-race trick (argmax of p / Exp(1)), with each row's noise drawn from
its own torch.Generator when it has a seed, so a seeded request gives the same tokens whatever it is
batched with.

`sample_ids` only queues GPU work (no host sync: small index tensors go through pinned memory), so the
engine can launch the next step before this one's ids reach the host; `sample` is the synchronous
form (ids as a list, plus logprob dicts).
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


def logprob_dicts(raw_lp: torch.Tensor | None, rows: list[SampleRow], ids: list[int]) -> list[dict | None]:
    """Per-row {"token_id", "logprob", "top"} for rows that asked for logprobs (host sync)."""
    lps: list[dict | None] = [None] * len(rows)
    if raw_lp is None:
        return lps
    for i, r in enumerate(rows):
        if r.logprobs is None:
            continue
        top = []
        if r.logprobs > 0:
            v, k = raw_lp[i].topk(r.logprobs)
            top = [[int(t), float(l)] for t, l in zip(k.tolist(), v.tolist())]
        lps[i] = {"token_id": ids[i], "logprob": float(raw_lp[i, ids[i]]), "top": top}
    return lps


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[dict | None]]:
    """Synchronous form: logits [n, V] float32 -> (token ids, per-row logprob dicts or None)."""
    out, raw_lp = sample_ids(logits, rows)
    ids = out.tolist()
    return ids, logprob_dicts(raw_lp, rows, ids)


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
