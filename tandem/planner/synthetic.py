"""A SYNTHETIC perf profile (roofline model, not a measurement) for tests and what-if studies.

Only for use when no profile measured by `tandem profile` is at hand. The numbers come from a
simple roofline of a Llama-3.1-8B-shaped model in bf16 on one H100-class GPU:

* prefill step of n tokens: fixed overhead + n x 2 x params / (matmul TFLOP/s x efficiency)
  + quadratic attention;
* decode step of batch b at context c: read the weights once + read b x c x kv_bytes_per_token of
  KV + b x 2 x params of compute + overhead;
* KV capacity: (HBM - weights - activations) / kv_bytes_per_token.

Every profile built here carries ``"synthetic": true`` and ``"device": "synthetic-..."``.
"""
from __future__ import annotations

import math


def synthetic_profile(params_b: float = 8.0, hbm_gb: float = 80.0, hbm_tbps: float = 3.0,
                      tflops: float = 700.0, mfu_prefill: float = 0.5, layers: int = 32,
                      kv_heads: int = 8, head_dim: int = 128, max_num_batched_tokens: int = 8192,
                      worker_start_s: float = 60.0, role_flip_s: float = 1.0,
                      copy_bandwidth_gbps: float = 390.0) -> dict:
    weights = params_b * 1e9 * 2                                     # bytes, bf16
    kv_bpt = layers * kv_heads * head_dim * 2 * 2                    # K and V, bf16
    flops_tok = 2 * params_b * 1e9
    eff_flops = tflops * 1e12 * mfu_prefill
    bw = hbm_tbps * 1e12 * 0.8
    hidden = kv_heads * head_dim * 4                                # q heads = 4 x kv heads

    def prefill_t(n: float, cached: float = 0.0) -> float:
        lin = n * flops_tok / eff_flops
        attn = 4 * layers * hidden * n * (cached + n / 2) / eff_flops
        return 0.004 + lin + attn

    def decode_t(b: float, c: float) -> float:
        return 0.003 + weights / bw + b * c * kv_bpt / bw + b * flops_tok / (tflops * 1e12 * 0.6)

    p_tokens = [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    cached = [0, 1024, 4096, 8192, 16384, 32768]
    batch = [1, 8, 16, 32, 64, 128, 256, 512]
    ctx = [128, 512, 1024, 2048, 4096, 8192, 16384]
    kv_cap = int((hbm_gb * 1e9 * 0.9 - weights - 4e9) / kv_bpt)
    return {
        "model": f"synthetic-llama-{params_b:g}b", "device": "synthetic-roofline-h100",
        "dtype": "bfloat16", "synthetic": True, "block_size": 16,
        "kv_capacity_tokens": kv_cap, "max_num_batched_tokens": max_num_batched_tokens,
        "prefill": {"tokens": p_tokens, "time_s": [prefill_t(n) for n in p_tokens]},
        "prefill_ctx": {"cached_tokens": cached, "new_tokens": 512,
                        "time_s": [prefill_t(512, c) for c in cached]},
        "decode": {"batch": batch, "context": ctx,
                   "time_s": [[decode_t(b, c) for c in ctx] for b in batch]},
        "weight_load_s": round(weights / 1e9 / 1.0, 1),          # ~1 GB/s from disk
        "worker_start_s": worker_start_s, "role_flip_s": role_flip_s,
        "kv_bytes_per_token": kv_bpt, "copy_bandwidth_gbps": copy_bandwidth_gbps,
        "matmul_tflops": tflops * mfu_prefill,
    }


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys
    json.dump(synthetic_profile(), sys.stdout, indent=1)
    print()
    _ = math
