"""A request's state inside one engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tandem.common.sampling import PRIORITIES, SamplingParams


_RANK = {p: i for i, p in enumerate(PRIORITIES)}


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: str = "interactive"
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    hold_kv: bool = False                 # keep blocks after finishing (for export to another worker)
    # engine state
    status: Status = Status.WAITING
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0            # prompt tokens that came from the prefix cache / import
    num_preemptions: int = 0
    seq: int = 0                          # admission order, FCFS tie-break
    finish_reason: str | None = None
    held_at: float = 0.0
    # per-request output state (set by the engine)
    detok: object = None
    generator: object = None
    sample_row: object = None             # the engine's cached SampleRow (once no token is banned)
    text: str = ""
    sent_text_len: int = 0
    pending_logprobs: list = field(default_factory=list)
    sent_tokens: int = 0

    def __post_init__(self):
        if self.priority not in PRIORITIES:
            raise ValueError(self.priority)
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def rank(self) -> int:
        return _RANK[self.priority]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def remaining_to_compute(self) -> int:
        return len(self.all_token_ids) - self.num_computed_tokens

    def append_token(self, tok: int) -> None:
        self.output_token_ids.append(tok)
        self.all_token_ids.append(tok)
