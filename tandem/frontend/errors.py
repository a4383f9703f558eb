"""OpenAI-style error JSON for every failure: `{"error": {"message", "type", "param", "code"}}`.

Request validation errors (including malformed JSON) are 400, not FastAPI's 422; unknown routes keep
their 404/405; `TandemError`s carry their own status (429 adds Retry-After); anything unexpected is
logged and still answered with JSON.
"""
from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.common.errors import Overloaded, TandemError

log = logging.getLogger("tandem.frontend")

TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                  404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                  429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error with an HTTP status, raised anywhere in request handling."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    @classmethod
    def from_tandem(cls, e: TandemError) -> "APIError":
        headers = None
        if isinstance(e, Overloaded):
            headers = {"Retry-After": str(max(1, int(math.ceil(e.retry_after))))}
        return cls(e.http_status, str(e), e.code, getattr(e, "param", None), headers=headers)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   type: str | None = None, headers: dict | None = None) -> JSONResponse:
    e = APIError(status, message, code, param, type, headers)
    return JSONResponse(e.body(), status_code=status, headers=headers)


def _loc_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    msgs = []
    for e in errs[:5]:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return f"malformed JSON in request body: {ctx.get('error', e.get('msg'))}", None
        p = _loc_param(e.get("loc", ()))
        msgs.append(f"{p}: {e.get('msg')}" if p else str(e.get("msg")))
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return "invalid request: " + "; ".join(msgs) + more, _loc_param(errs[0].get("loc", ()))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        return error_response(400, msg, "invalid_request_error" if param is None or "JSON" not in msg else None,
                              param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return error_response(status, msg, code, headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(TandemError)
    async def _tandem(request: Request, exc: TandemError):
        e = APIError.from_tandem(exc)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
