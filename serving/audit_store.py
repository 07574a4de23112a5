"""The audit log store: who did what, when, from where — every admin API and CLI change.

Append-only: rows are inserted, never updated or deleted by the platform. `detail` is JSON and never
holds a secret (an API key's plaintext is never passed here; its id and prefix are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from metering.clock import to_aware, to_naive, utcnow
from serving.tables import audit_log


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    source: str  # api | cli
    client: str | None  # IP address (api) or host name (cli)
    action: str
    target: str | None
    tenant_id: str | None
    outcome: str  # ok | error
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "source": self.source,
            "client": self.client,
            "action": self.action,
            "target": self.target,
            "tenant_id": self.tenant_id,
            "outcome": self.outcome,
            "detail": self.detail,
        }


class AuditStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(
        self,
        *,
        actor: str,
        source: str,
        client: str | None,
        action: str,
        target: str | None = None,
        tenant_id: str | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> None:
        row = {
            "at": to_naive(utcnow()),
            "actor": actor[:200],
            "source": source,
            "client": (client or "")[:200] or None,
            "action": action,
            "target": target,
            "tenant_id": tenant_id,
            "outcome": outcome,
            "detail": json.dumps(detail or {}, default=str, sort_keys=True),
        }
        with self._engine.begin() as conn:
            conn.execute(insert(audit_log).values(**row))

    def list(
        self,
        *,
        tenant_id: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        q = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if tenant_id is not None:
            q = q.where(audit_log.c.tenant_id == tenant_id)
        if action is not None:
            q = q.where(audit_log.c.action == action)
        if since is not None:
            q = q.where(audit_log.c.at >= to_naive(since))
        with self._engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        out = []
        for r in rows:
            at = to_aware(r["at"])
            assert at is not None
            out.append(
                AuditEntry(
                    id=int(r["id"]),
                    at=at,
                    actor=r["actor"],
                    source=r["source"],
                    client=r["client"],
                    action=r["action"],
                    target=r["target"],
                    tenant_id=r["tenant_id"],
                    outcome=r["outcome"],
                    detail=json.loads(r["detail"] or "{}"),
                )
            )
        return out
