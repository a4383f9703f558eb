"""Engine configuration (one worker's engine)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str                               # HF-format model directory
    device: str = "auto"                     # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"                      # "auto" (fp32 on CPU, bf16 on CUDA) | "float32" | "bfloat16" | "float16"
    block_size: int = 16
    num_kv_blocks: int | None = None         # None: sized from kv_cache_memory_gb / gpu_memory_utilization
    kv_cache_memory_gb: float | None = None  # CPU default: 0.25 GiB
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048       # per-step token budget (prefill chunks + decodes)
    prefill_chunk_while_decoding: int | None = None  # prompt tokens a step with decodes may add (None: the budget)
    max_model_len: int | None = None         # default: model's max_position_embeddings
    enable_prefix_caching: bool = True
    aging_s: float = 30.0                    # a waiting request climbs one priority class per aging_s
    seed: int = 0
    cuda_graphs: bool = True
    # launch the next decode step before the host has read the previous one's tokens (overlaps host
    # work with the GPU). None = auto: on for CUDA, off on CPU (env TANDEM_ASYNC_SCHEDULING overrides).
    async_scheduling: bool | None = None
    # CPU threads for torch ops. Default 1 (env TANDEM_CPU_THREADS overrides): several worker processes
    # share the cores, and OpenMP spin-waits under oversubscription made steps ~20x slower in tests.
    cpu_threads: int | None = None
