"""A request's state inside one engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, MutableSequence, Sequence

from tandem.common.sampling import PRIORITIES, SamplingParams


PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}   # lower is served first


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
    all_token_ids: MutableSequence[int] = field(default_factory=list)   # the simulator keeps only a count
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: Sequence[int] = field(default_factory=list)          # the simulator may give a range
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0            # prompt tokens that came from the prefix cache / import
    num_preemptions: int = 0
    seq: int = 0                          # admission order, FCFS tie-break
    finish_reason: str | None = None
    held_at: float = 0.0
    first_scheduled_at: float | None = None   # when a step first ran it: arrival -> this is its queue wait
    # per-request output state (set by the engine)
    detok: Any = None
    generator: Any = None
    sample_row: Any = None                # the engine's cached SampleRow (once no token is banned)
    text: str = ""
    sent_text_len: int = 0
    pending_logprobs: list = field(default_factory=list)
    sent_tokens: int = 0
    rank: int = field(default=0, init=False)              # place of `priority` in PRIORITIES (fixed)
    _graph_bt: Any = field(default=None, init=False, repr=False)   # the CUDA-graph runner's row state

    def __post_init__(self) -> None:
        rank = PRIORITY_RANK.get(self.priority)
        if rank is None:
            raise ValueError(self.priority)
        self.rank = rank
        self._graph_bt = None            # init=False fields: compiled (mypyc) classes need them set here
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

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
