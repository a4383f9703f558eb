"""Per-request record: what `tandem bench` measures and `tandem sim` produces.

Plain fields only, so `dataclasses.asdict` gives the JSON of one entry of the report's
``requests`` list and `RequestRecord(**d)` reads it back. Times are seconds; `arrival_s` is the
scheduled send time relative to the start of the run, every other time is relative to the actual
send (`arrival_s + dispatch_lag_s`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

OK = "ok"
ERROR = "error"


@dataclass
class RequestRecord:
    arrival_s: float                  # scheduled send time (s after the run start)
    cls: str
    priority: str
    isl: int                          # prompt tokens intended
    osl_requested: int                # max_tokens (and min_tokens with --ignore-eos)
    output_tokens: int = 0            # from usage if the server reported it, else streamed chunks
    ttft_s: float | None = None       # first streamed chunk with output
    token_times_s: list[float] = field(default_factory=list)   # every chunk with output
    e2e_s: float | None = None        # end of the stream (or the failure)
    status: str = OK                  # "ok" | "error"
    error_kind: str | None = None     # http_<code> | timeout | connect | disconnect | stream_error | empty_output | client_<Exc>
    # measured by the bench client; a simulator may leave the defaults
    idx: int = -1
    dispatch_lag_s: float = 0.0       # actual send - scheduled send
    prompt_tokens: int | None = None  # usage.prompt_tokens (the server's count)
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if reported
    finish_reason: str | None = None
    error: str | None = None          # message (truncated)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self, ndigits: int | None = 6) -> dict:
        d = {f: getattr(self, f) for f in _FIELDS}
        d["token_times_s"] = list(self.token_times_s)
        if ndigits is not None:
            d["token_times_s"] = [round(t, ndigits) for t in self.token_times_s]
            for k in ("arrival_s", "ttft_s", "e2e_s", "dispatch_lag_s"):
                if d[k] is not None:
                    d[k] = round(d[k], ndigits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        known = _FIELD_SET if cls is RequestRecord or cls.__dataclass_fields__ is _DC_FIELDS else \
            {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_FIELDS = tuple(f.name for f in fields(RequestRecord))
_FIELD_SET = frozenset(_FIELDS)
_DC_FIELDS = RequestRecord.__dataclass_fields__


def as_record(r) -> RequestRecord:
    return r if isinstance(r, RequestRecord) else RequestRecord.from_dict(r)
