"""One error hierarchy for the gateway, rendered in one place in OpenAI's error shape.

    TokenportError (500, api_error)
    ├── InvalidRequest (400, invalid_request_error)
    │   ├── BodyTooLarge (413)
    │   ├── InvalidOriginCountry (400)
    │   ├── limits.ContextLengthExceeded, MaxTokensExceeded, RequestShapeError (400)
    │   ├── limits.RequestTimeout (408), limits.HeadersTooLarge (431)
    │   └── UpstreamRejected (the worker's 4xx status, upstream_rejected / context_length_exceeded)
    ├── AuthenticationFailed (401, invalid_request_error / invalid_api_key)
    ├── PermissionDenied (403, permission_error)
    │   └── limits.ModelNotPriced (403)
    ├── NotFound (404, invalid_request_error)
    │   └── ModelNotFound (404, model_not_found)
    ├── Conflict (409)           idempotency: in progress / key consumed
    ├── RateLimited (429, rate_limit_error)
    │   ├── limits.RateLimitExceeded (429, with x-ratelimit-* headers)
    │   └── limits.QuotaExceeded (429, insufficient_quota: budget spent)
    ├── UpstreamError (502, api_error)
    ├── NoHealthyWorker (503, service_unavailable)
    └── ServiceUnavailable (503, service_unavailable)
        └── limits.LimitsUnavailable (503: the budget store is down and budgets fail closed)

(`limits.` = serving/limits/errors.py.) Billing errors (billing/errors.py) are mapped to 4xx by the
admin and tenant invoice routes.

The body is always {"error": {"message", "type", "param", "code"}}, as OpenAI sends it, so the
official SDKs raise their matching exception classes. `render(exc)` is the one place an exception
becomes a response (the completion pipeline and FastAPI's exception handlers both call it): any
other exception is an internal error, logged, and answered 500 in the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from metering.ledger import LedgerUnavailable

log = logging.getLogger("tokenport.gateway")
JSON_HEADERS = {"content-type": "application/json"}


class TokenportError(Exception):
    status_code = 500
    error_type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as one SSE event, for failures after a stream has started."""
        return b"data: " + self.body_bytes() + b"\n\n"


class InvalidRequest(TokenportError):
    status_code = 400
    error_type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class InvalidOriginCountry(InvalidRequest):
    code = "invalid_origin_country"


class UpstreamRejected(InvalidRequest):
    """The worker refused the request (a 4xx): told in our own words, with the worker's status."""

    code = "upstream_rejected"

    def __init__(self, message: str, status: int, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status_code = status


class AuthenticationFailed(TokenportError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(TokenportError):
    status_code = 403
    error_type = "permission_error"


class NotFound(TokenportError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(TokenportError):
    status_code = 409
    error_type = "invalid_request_error"


class RateLimited(TokenportError):
    status_code = 429
    error_type = "rate_limit_error"


class UpstreamError(TokenportError):
    status_code = 502
    error_type = "api_error"
    code = "upstream_error"


class ServiceUnavailable(TokenportError):
    status_code = 503
    error_type = "service_unavailable"


class NoHealthyWorker(ServiceUnavailable):
    code = "no_healthy_worker"


def ledger_unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The usage ledger is unavailable, so requests are refused (metering.fail_closed); retry shortly.",
        code="ledger_unavailable",
    )


def to_error(exc: BaseException) -> TokenportError:
    """Any exception as the gateway error the client gets."""
    if isinstance(exc, TokenportError):
        return exc
    if isinstance(exc, LedgerUnavailable):
        return ledger_unavailable()
    if isinstance(exc, RequestValidationError):  # FastAPI's own validation (admin and tenant routes)
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return InvalidRequest(str(first.get("msg")), param=param)
    if isinstance(exc, HTTPException):  # Starlette's routing: unknown route, method not allowed
        if exc.status_code == 404:
            return NotFound("Unknown route.", code="unknown_route")
        err = TokenportError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "api_error"
        return err
    log.error("unexpected error", exc_info=exc)
    return TokenportError("The gateway had an internal error.")


def render(exc: BaseException) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the response that answers `exc`, in OpenAI's error shape."""
    err = to_error(exc)
    return err.status_code, {**JSON_HEADERS, **err.headers}, err.body_bytes()
