"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs.

Random rows use the exponential-race trick (argmax of p / Exp(1)), with each row's noise drawn from
its own torch.Generator when it has a seed, so a seeded request gives the same tokens whatever it is
batched with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleRow:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    banned: list[int]          # token ids masked out (EOS / stop ids before min_tokens)
    logprobs: int | None


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[dict | None]]:
    """logits [n, V] float32 -> (token ids, per-row logprob dicts or None)."""
    n, vocab = logits.shape
    want_lp = any(r.logprobs is not None for r in rows)
    raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
    for i, r in enumerate(rows):
        if r.banned:
            logits[i, r.banned] = float("-inf")
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.temperature == 0.0]
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=-1)
    rand = [i for i, r in enumerate(rows) if r.temperature > 0.0]
    if rand:
        x = logits[rand] / torch.tensor([rows[i].temperature for i in rand], device=logits.device)[:, None]
        x = _top_k_top_p(x, [rows[i].top_k for i in rand], [rows[i].top_p for i in rand])
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(rand):
            g = rows[i].generator
            if g is not None and g.device != probs.device:
                noise[j] = torch.empty(vocab, device=g.device).exponential_(generator=g).to(probs.device)
            else:
                noise[j].exponential_(generator=g)
        out[rand] = (probs / noise).argmax(dim=-1)
    ids = out.tolist()
    lps: list[dict | None] = [None] * n
    if want_lp:
        for i, r in enumerate(rows):
            if r.logprobs is None:
                continue
            top = []
            if r.logprobs > 0:
                v, k = raw_lp[i].topk(r.logprobs)
                top = [[int(t), float(l)] for t, l in zip(k.tolist(), v.tolist())]
            lps[i] = {"token_id": ids[i], "logprob": float(raw_lp[i, ids[i]]), "top": top}
    return ids, lps


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return x
    sorted_x, idx = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=x.device)
    pos = torch.arange(vocab, device=x.device)[None, :]
    mask = pos >= ks[:, None]
    probs = torch.softmax(sorted_x.masked_fill(mask, float("-inf")), dim=-1)
    cum = probs.cumsum(dim=-1) - probs                      # mass strictly before each token
    mask |= cum >= torch.tensor(top_p, device=x.device)[:, None]
    mask[:, 0] = False                                      # always keep the best token
    sorted_x = sorted_x.masked_fill(mask, float("-inf"))
    return torch.empty_like(x).scatter_(-1, idx, sorted_x)
