"""The admin credential: a bearer token separate from tenant keys, compared in constant time."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request

from serving.errors import AuthenticationFailed


@dataclass(frozen=True, slots=True)
class Admin:
    """Who performed an admin action (for the audit log)."""

    actor: str
    client_ip: str | None


class AdminAuth:
    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def __call__(self, request: Request) -> Admin:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise AuthenticationFailed("Admin routes need 'Authorization: Bearer <admin token>'.",
                                       code="invalid_admin_token")
        return Admin(actor="admin", client_ip=request.client.host if request.client else None)
