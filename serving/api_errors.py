"""Domain errors -> API errors, by type (never by message text), and the app's error handlers.

Registry errors (metering/tenants.py): not found 404, exists 409, anything else 400. Billing errors
(billing/errors.py): unknown document 404, forbidden state change 409, invalid input 400, config 409.
Unreadable or out-of-range times and periods (serving/dates.py, metering/clock.py): 400. Every error
is rendered in OpenAI's shape by the one renderer (serving/errors.py: `render`).
"""

from __future__ import annotations

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
from serving.errors import Conflict, InvalidRequest, NotFound, TokenportError, render
from serving.pipeline import REQUEST_ID, new_request_id


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


def to_api_error(exc: BaseException) -> BaseException:
    """A domain error (registry, billing, time, period) as the gateway error it answers; others as they
    are."""
    if isinstance(exc, RegistryError):
        return registry_error(exc)
    if isinstance(exc, BillingError):
        return billing_error(exc)
    if isinstance(exc, InvalidTime):
        return time_error(exc)
    if isinstance(exc, InvalidPeriod):
        return InvalidRequest(str(exc), code="invalid_billing_request")
    return exc


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error the admin, tenant and ops routes raise, in OpenAI's shape through the one renderer
    (serving/errors.py: render); 500 only for bugs."""

    async def on_error(_r: Request, exc: Exception) -> Response:
        status, headers, body = render(to_api_error(exc))
        return Response(body, status, headers=headers)

    for known in (
        TokenportError,
        RegistryError,
        BillingError,
        InvalidTime,
        InvalidPeriod,
        LedgerUnavailable,
        RequestValidationError,
        StarletteHTTPException,
    ):
        app.add_exception_handler(known, on_error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette runs this handler outside the Pipeline: add the request id and count it here.
        status, headers, body = render(exc)
        headers["X-Request-Id"] = str(request.scope.get(REQUEST_ID) or new_request_id())
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.responses.labels(route, str(status)).inc()
        return Response(body, status, headers=headers)
