"""Audited admin actions: every change made through the admin API or the CLI goes through `Auditor.run`.

`Auditor.run` performs the change and appends one row: who (the admin credential, or the OS user for
the CLI), what (action, target, tenant, parameters without secrets), when (UTC), from where (client
IP, or host name for the CLI) and whether it succeeded. A failed attempt is recorded too. Not an HTTP
module: the CLI and the admin API (serving/admin/) both use it.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from serving.audit_store import AuditStore

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Who:
    actor: str
    source: str  # api | cli
    client: str | None

    @classmethod
    def api(cls, actor: str, client_ip: str | None) -> Who:
        return cls(actor, "api", client_ip)

    @classmethod
    def cli(cls) -> Who:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry in some containers
            user = "unknown"
        return cls(user, "cli", socket.gethostname())


class Auditor:
    def __init__(self, store: AuditStore) -> None:
        self.store = store

    def run(
        self,
        who: Who,
        action: str,
        fn: Callable[[], T],
        *,
        target: str | None = None,
        tenant_id: str | None = None,
        detail: dict[str, Any] | None = None,
        describe: Callable[[T], dict[str, Any]] | None = None,
    ) -> T:
        """Do `fn` and record it: ok with `describe(result)` merged into detail, or error with its message."""
        try:
            result = fn()
        except Exception as exc:
            self.store.record(
                actor=who.actor,
                source=who.source,
                client=who.client,
                action=action,
                target=target,
                tenant_id=tenant_id,
                outcome="error",
                detail={**(detail or {}), "error": str(exc)},
            )
            raise
        extra = describe(result) if describe is not None else {}
        self.store.record(
            actor=who.actor,
            source=who.source,
            client=who.client,
            action=action,
            target=extra.pop("target", target),
            tenant_id=tenant_id,
            outcome="ok",
            detail={**(detail or {}), **extra},
        )
        return result
