"""Messages the engine emits each step (torch-free; msgpack-able via `asdict`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One step's delta for one request. The final delta has `finished=True`."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0            # prompt tokens served from the prefix cache (or imported KV)
    # per new token: {"token_id": int, "logprob": float, "top": [[token_id, logprob], ...]}
    logprobs: list[dict] | None = None
    error: str | None = None
    queue_s: float | None = None          # on the output with the first token: arrival -> first scheduled


@dataclass
class EngineStats:
    """A snapshot the worker publishes for the router and planner."""
    num_running: int = 0
    num_waiting: dict[str, int] = field(default_factory=dict)   # by priority class
    waiting_prefill_tokens: int = 0                             # uncomputed prompt tokens queued
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached_free: int = 0
    num_preemptions: int = 0
    steps: int = 0
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    last_step_s: float = 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
