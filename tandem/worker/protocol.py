"""Messages between the frontend and worker processes (torch-free; msgpack on the wire).

Every message is a dataclass with a short wire tag; on the wire it is the msgpack of
`[tag, {field: value, ...}]`. Frontend -> worker: `Generate`, `Abort`, `SetRole`, `Shutdown`.
Worker -> frontend: `Ready`, `Deltas` (all outputs of one engine step in one message), `WorkerStatus`
(stats + KV cache events, also the heartbeat), `WorkerFailed`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack

ROLES = ("both", "prefill", "decode")


@dataclass
class Generate:
    TAG: ClassVar[str] = "gen"
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict                       # SamplingParams.to_dict()
    priority: str = "interactive"
    hold_kv: bool = False                # prefill worker keeps KV for export (disaggregation)
    output_token_ids: list[int] | None = None   # resume a generation started elsewhere
    kv_source: dict | None = None        # {"addr", "request_id"}: fetch this request's KV from a peer first
    unsent_text_chars: int = 0           # trailing chars of output_token_ids' text the client has not seen
    #                                      (held back: they may start a stop string); this worker streams them


@dataclass
class Abort:
    TAG: ClassVar[str] = "abort"
    request_ids: list[str]


@dataclass
class SetRole:
    TAG: ClassVar[str] = "role"
    role: str
    migrate: bool = True                 # decode→prefill: hand in-flight decodes to other workers


@dataclass
class Shutdown:
    TAG: ClassVar[str] = "bye"
    reason: str = ""


@dataclass
class Ready:
    TAG: ClassVar[str] = "ready"
    worker_id: str
    role: str
    addr: str                            # where the worker's command socket is bound
    pid: int
    model: str
    device: str
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    vocab_size: int
    host: str = ""
    kv_addr: str = ""                    # where the worker serves held KV to peers (transfer layer)


@dataclass
class Delta:
    """One request's output of one step (mirrors `tandem.common.outputs.RequestOutput`), plus how to
    report an error: `error_status` is the HTTP status the frontend should answer with."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[dict] | None = None
    error: str | None = None
    error_status: int | None = None
    error_code: str | None = None
    error_param: str | None = None
    queue_s: float | None = None         # with the first token: the request's wait for its first step

    @classmethod
    def from_output(cls, o: Any) -> "Delta":
        return cls(o.request_id, list(o.new_token_ids), o.new_text, o.finished, o.finish_reason,
                   o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens, o.logprobs,
                   getattr(o, "error", None), queue_s=getattr(o, "queue_s", None))

    @classmethod
    def failure(cls, request_id: str, message: str, status: int = 500, code: str = "internal_error",
                param: str | None = None) -> "Delta":
        return cls(request_id, [], "", True, "error", error=message, error_status=status, error_code=code,
                   error_param=param)


@dataclass
class Deltas:
    TAG: ClassVar[str] = "out"
    worker_id: str
    outputs: list[Delta]


@dataclass
class WorkerStatus:
    TAG: ClassVar[str] = "status"
    worker_id: str
    role: str
    seq: int
    stats: dict                          # EngineStats fields + kv_usage
    kv_stored: list[int] = field(default_factory=list)
    kv_evicted: list[int] = field(default_factory=list)
    num_active: int = 0
    time: float = field(default_factory=time.time)


@dataclass
class Migrated:
    """Worker → frontend: the worker stopped generating this request (role flip) and holds its KV;
    continue it on another worker with `output_token_ids` and the KV at `kv_addr`."""
    TAG: ClassVar[str] = "migrated"
    worker_id: str
    request_id: str
    output_token_ids: list[int]
    kv_addr: str
    unsent_text_chars: int = 0           # trailing chars of the text held back (stop strings): the next worker streams them


@dataclass
class WorkerFailed:
    TAG: ClassVar[str] = "failed"
    worker_id: str
    error: str


MESSAGES = {c.TAG: c for c in (Generate, Abort, SetRole, Shutdown, Ready, Deltas, WorkerStatus, WorkerFailed,
                                Migrated)}
_DELTA_FIELDS = tuple(f.name for f in fields(Delta))


def _plain(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def encode(msg) -> bytes:
    if isinstance(msg, Deltas):
        body = {"worker_id": msg.worker_id,
                "outputs": [[getattr(d, f) for f in _DELTA_FIELDS] for d in msg.outputs]}
    else:
        body = _plain(msg)
    return msgpack.packb([msg.TAG, body], use_bin_type=True)


def decode(buf: bytes):
    tag, body = msgpack.unpackb(buf, raw=False, strict_map_key=False)
    cls = MESSAGES.get(tag)
    if cls is None:
        raise ValueError(f"unknown message tag {tag!r}")
    if cls is Deltas:
        return Deltas(body["worker_id"], [Delta(*row) for row in body["outputs"]])
    return cls(**body)
