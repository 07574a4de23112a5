"""Audited admin actions and the audit log API (GET /admin/v1/audit).

Every change made through the admin API or the CLI goes through `Auditor.run`, which performs it and
appends one row — who (the admin credential, or the OS user for the CLI), what (action, target,
tenant, parameters without secrets), when (UTC), from where (client IP, or host name for the CLI) and
whether it succeeded. A failed attempt is recorded too.
"""

import asyncio
import getpass
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from serving.admin.auth import Admin
from serving.audit_store import AuditStore

if TYPE_CHECKING:
    from serving.app import Platform

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Who:
    actor: str
    source: str  # api | cli
    client: str | None

    @classmethod
    def api(cls, admin: Admin) -> "Who":
        return cls(admin.actor, "api", admin.client_ip)

    @classmethod
    def cli(cls) -> "Who":
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry in some containers
            user = "unknown"
        return cls(user, "cli", socket.gethostname())


class Auditor:
    def __init__(self, store: AuditStore) -> None:
        self.store = store

    def run(self, who: Who, action: str, fn: Callable[[], T], *, target: str | None = None,
            tenant_id: str | None = None, detail: dict[str, Any] | None = None,
            describe: Callable[[T], dict[str, Any]] | None = None) -> T:
        """Do `fn` and record it (ok with `describe(result)` merged into detail, or error with its message)."""
        try:
            result = fn()
        except Exception as exc:
            self.store.record(actor=who.actor, source=who.source, client=who.client, action=action, target=target,
                              tenant_id=tenant_id, outcome="error", detail={**(detail or {}), "error": str(exc)})
            raise
        extra = describe(result) if describe is not None else {}
        self.store.record(actor=who.actor, source=who.source, client=who.client, action=action,
                          target=extra.pop("target", target), tenant_id=tenant_id, outcome="ok",
                          detail={**(detail or {}), **extra})
        return result


def build(platform: "Platform") -> APIRouter:
    r = APIRouter(prefix="/admin/v1", tags=["admin"])
    AdminDep = Annotated[Admin, Depends(platform.admin)]
    store = platform.guardrails.audit.store

    @r.get("/audit")
    async def list_audit(_admin: AdminDep, tenant_id: str | None = Query(default=None, max_length=64),
                         action: str | None = Query(default=None, max_length=64),
                         limit: int = Query(default=100, ge=1, le=1000)) -> Response:
        rows = await asyncio.to_thread(store.list, tenant_id=tenant_id, action=action, limit=limit)
        return Response(orjson.dumps({"object": "list", "data": [e.as_dict() for e in rows]}),
                        media_type="application/json")

    return r
