"""Domain errors -> API errors, by type (never by message text), and the app's error handlers.

Registry errors (metering/tenants.py): not found 404, exists 409, anything else 400. Billing errors
(billing/errors.py): unknown document 404, forbidden state change 409, invalid input 400, config 409.
Unreadable or out-of-range times and periods (serving/dates.py, metering/clock.py): 400. Every error
is rendered in OpenAI's shape by the one renderer (`error_response`).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from billing.errors import BillingError, ConfigError, DocumentStateError, FxImportError, InvalidUsage
from billing.store import NotFound as DocumentNotFound
from metering.clock import InvalidPeriod
from metering.ledger import LedgerUnavailable
from metering.metrics import Metrics
from metering.tenants import KeyNotFound, RegistryError, TenantExists, TenantNotFound
from serving.dates import InvalidTime
from serving.errors import Conflict, InvalidRequest, NotFound, TokenportError
from serving.front import error_response, ledger_unavailable
from serving.openai.service import new_request_id

log = logging.getLogger("tokenport.gateway")


def _sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def registry_error(exc: RegistryError) -> TokenportError:
    msg = _sentence(str(exc))
    if isinstance(exc, (TenantNotFound, KeyNotFound)):
        return NotFound(msg)
    if isinstance(exc, TenantExists):
        return Conflict(msg, code="already_exists")
    return InvalidRequest(msg)


def billing_error(exc: BillingError) -> TokenportError:
    message = str(exc)
    if isinstance(exc, DocumentNotFound):
        return NotFound(message, code="invoice_not_found")
    if isinstance(exc, DocumentStateError):
        return Conflict(message, code="invoice_state")
    if isinstance(exc, (InvalidUsage, FxImportError)):
        return InvalidRequest(message, code="invalid_billing_request")
    if isinstance(exc, ConfigError):
        return Conflict(message, code="billing_config")
    return Conflict(message, code="billing_error")


def time_error(exc: InvalidTime) -> TokenportError:
    return InvalidRequest(_sentence(str(exc)), param=exc.name)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error the admin, tenant and ops routes raise, in OpenAI's shape (500 only for bugs)."""

    @app.exception_handler(TokenportError)
    async def on_tokenport_error(_r: Request, exc: TokenportError) -> Response:
        return error_response(exc)

    @app.exception_handler(RegistryError)
    async def on_registry_error(_r: Request, exc: RegistryError) -> Response:
        return error_response(registry_error(exc))

    @app.exception_handler(BillingError)
    async def on_billing_error(_r: Request, exc: BillingError) -> Response:
        return error_response(billing_error(exc))

    @app.exception_handler(InvalidTime)
    async def on_invalid_time(_r: Request, exc: InvalidTime) -> Response:
        return error_response(time_error(exc))

    @app.exception_handler(InvalidPeriod)
    async def on_invalid_period(_r: Request, exc: InvalidPeriod) -> Response:
        return error_response(InvalidRequest(str(exc), code="invalid_billing_request"))

    @app.exception_handler(LedgerUnavailable)
    async def on_ledger_unavailable(_r: Request, _exc: LedgerUnavailable) -> Response:
        return error_response(ledger_unavailable())

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_r: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        return error_response(InvalidRequest(str(err.get("msg")), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_r: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound("Unknown route.", code="unknown_route"))
        err = TokenportError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "api_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette runs this handler outside RequestIdMiddleware: add the id and count it here.
        log.error("unexpected error", exc_info=exc)
        err = TokenportError("The gateway had an internal error.")
        request_id = str(request.scope.get("tokenport.request_id") or new_request_id())
        err.headers = {"X-Request-Id": request_id}
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.responses.labels(route, "500").inc()
        return error_response(err)
