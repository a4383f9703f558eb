"""Typed errors. Each maps to one OpenAI-style HTTP status in the frontend."""


class TandemError(Exception):
    """Base class; `http_status` and `code` say how the frontend reports it."""
    http_status = 500
    code = "internal_error"


class InvalidParams(TandemError, ValueError):
    """A request or sampling parameter is out of range; the message names it."""
    http_status = 400
    code = "invalid_request_error"

    def __init__(self, msg: str, param: str | None = None):
        super().__init__(msg)
        self.param = param


class ContextTooLong(InvalidParams):
    """Prompt (+ max_tokens) does not fit in the model's context window."""
    code = "context_length_exceeded"


class ModelDirError(TandemError, ValueError):
    """Model directory missing, incomplete or malformed."""
    http_status = 404
    code = "model_not_found"


class UnknownPreset(TandemError, ValueError):
    http_status = 400
    code = "invalid_request_error"


class Overloaded(TandemError):
    """Admission control refused the request; retry after `retry_after` seconds."""
    http_status = 429
    code = "rate_limit_exceeded"

    def __init__(self, msg: str, retry_after: float = 1.0):
        super().__init__(msg)
        self.retry_after = retry_after
