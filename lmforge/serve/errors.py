"""Every failure as OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with its status.

Bad input is always a 4xx (never FastAPI's 422, never a 500); only bugs give 500, with a generic message and
the traceback in the log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lmforge.engine import EngineDraining, EngineOverloaded
from lmforge.errors import UserError
from lmforge.serve.auth import AuthError, api_error
from lmforge.serve.metering import QuotaExceeded, RateLimited
from lmforge.serve.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the server refuses, with the status and OpenAI `code` to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)


def error_for(exc: Exception, *, retry_after_s: int = 1) -> tuple[int, ErrorDetail, dict[str, str]]:
    """The status, body and headers for `exc` (also used for errors after a stream has begun)."""
    if isinstance(exc, APIError):
        return exc.status, exc.detail, {}
    if isinstance(exc, AuthError):  # 401 no or unknown key, 403 revoked, expired or model not allowed
        return error_for(api_error(exc))
    if isinstance(exc, RateLimited):  # the key's RPM or TPM: Retry-After and x-ratelimit-* in its headers
        return 429, ErrorDetail(message=exc.message, type=exc.type, code=exc.code), dict(exc.headers)
    if isinstance(exc, QuotaExceeded):  # the budget: x-should-retry false, or OpenAI's SDK retries it
        return 429, ErrorDetail(message=exc.message, type=exc.type, code=exc.code), dict(exc.headers)
    if isinstance(exc, UserError):
        return 400, ErrorDetail(message=str(exc), type="invalid_request_error"), {}
    if isinstance(exc, EngineOverloaded):
        message = "The server is overloaded: too many requests are waiting. Retry shortly."
        detail = ErrorDetail(message=message, type="server_overloaded", code="rate_limit_exceeded")
        return 429, detail, {"Retry-After": str(retry_after_s)}
    if isinstance(exc, EngineDraining):
        message = "The server is not accepting requests (starting up or shutting down)."
        return 503, ErrorDetail(message=message, type="service_unavailable"), {}
    log.exception("unexpected error while serving a request", exc_info=exc)
    message = "The server had an error while processing your request."
    return 500, ErrorDetail(message=message, type="internal_server_error"), {}


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> ErrorDetail:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        message = (
            f"We could not parse the JSON body of your request ({first.get('ctx', {}).get('error', '')})."
        )
        return ErrorDetail(message=message, type="invalid_request_error")
    # loc is ("body", "messages", 0, "content", ...): the field in the client's terms, as OpenAI's `param`
    path = [str(p) for p in first["loc"][1:] if p != "body"]
    param = ".".join(path) or None
    where = f"'{param}'" if param else "the request body"
    message = f"Invalid value for {where}: {first['msg']}."
    if len(exc.errors()) > 1:
        message += f" ({len(exc.errors()) - 1} more problem(s) in the request.)"
    return ErrorDetail(message=message, type="invalid_request_error", param=param, code="invalid_value")


def install(app: FastAPI, *, retry_after_s: int) -> None:
    """Register the handlers that turn exceptions into OpenAI-shaped responses."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_detail(exc))

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        detail = ErrorDetail(message=str(exc.detail), type="invalid_request_error", code=code)
        return error_response(exc.status_code, detail, exc.headers)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(*error_for(exc, retry_after_s=retry_after_s))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    refusals = (AuthError, RateLimited, QuotaExceeded)
    for exc_type in (APIError, UserError, EngineOverloaded, EngineDraining, *refusals, Exception):
        app.add_exception_handler(exc_type, on_error)
