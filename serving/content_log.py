"""Optional per-tenant content logging: prompts and completions, kept for a retention period.

By default nothing a tenant sends or receives is stored or logged (only token counts reach the
ledger): prompts can carry personal data, and cross-border data rules make storing them a decision
the tenant has to take. A tenant's `content_logging` setting turns it on, with
`content_retention_days` (default `limits.content_retention_days`); rows past their retention are
deleted by every gateway process every few minutes (and by `tokenport content purge`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.responses import Response, StreamingResponse

from metering.tenants import to_aware, to_naive, utcnow
from serving.response_store import ResponseStore, StreamWatcher, completed_response
from serving.tables import content_log

log = logging.getLogger("tokenport.content")
MAX_TEXT = 1_000_000  # characters kept of a completion


class ContentLogStore:
    """The only content_log SQL."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(
        self,
        *,
        request_id: str,
        tenant_id: str,
        key_id: str,
        model: str,
        request: bytes,
        completion: str | None,
        retention_days: int,
    ) -> None:
        now = utcnow()
        row = {
            "request_id": request_id,
            "tenant_id": tenant_id,
            "key_id": key_id,
            "model": model,
            "created_at": to_naive(now),
            "expires_at": to_naive(now + timedelta(days=retention_days)),
            "request": request.decode("utf-8", "replace"),
            "completion": completion,
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(content_log).values(**row))
        except IntegrityError:
            pass  # already stored (idempotent by request id)

    def for_tenant(self, tenant_id: str, limit: int = 100) -> list[dict[str, Any]]:
        q = (
            select(content_log)
            .where(content_log.c.tenant_id == tenant_id)
            .order_by(content_log.c.created_at.desc())
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [
            {**dict(r), "created_at": to_aware(r["created_at"]), "expires_at": to_aware(r["expires_at"])}
            for r in rows
        ]

    def purge(self) -> int:
        """Delete rows past their retention; returns how many."""
        with self._engine.begin() as conn:
            res = conn.execute(delete(content_log).where(content_log.c.expires_at <= to_naive(utcnow())))
        return int(res.rowcount or 0)


def _completion_text(payload: bytes) -> str | None:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    parts = []
    for choice in obj.get("choices") or []:
        if isinstance(choice, dict):
            msg = choice.get("message")
            text = msg.get("content") if isinstance(msg, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
    return "\n".join(parts)


class ContentLogger:
    """Stores a request and its completion when the tenant's policy says so; otherwise does nothing."""

    def __init__(
        self,
        store: ContentLogStore,
        policy: Callable[[str], tuple[bool, int]],
        purge_every_s: float = 300.0,
        responses: ResponseStore | None = None,
    ) -> None:
        self.store = store
        self.responses = responses  # Responses API objects kept for GET /v1/responses/{id}
        self.policy = policy  # tenant id -> (enabled, retention days)
        self.purge_every_s = purge_every_s
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._purge_loop(), name="content-log-purge")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def _purge_loop(self) -> None:
        while True:
            try:
                n = await asyncio.to_thread(self.store.purge)
                if self.responses is not None:
                    n += await asyncio.to_thread(self.responses.purge)
                if n:
                    log.info("purged %d content log rows past retention", n)
            except SQLAlchemyError as exc:
                log.error("content log purge failed: %s", exc)
            await asyncio.sleep(self.purge_every_s)

    def wrap(
        self,
        response: Response,
        *,
        request_id: str,
        tenant_id: str,
        key_id: str,
        model: str,
        request: bytes,
        keep_response: bool = False,
    ) -> Response:
        """`keep_response`: a Responses API call asking to be stored (kept if the tenant logs content)."""
        enabled, days = self.policy(tenant_id)
        if not enabled:
            return response

        def later(fn: Callable[..., object], **kwargs: object) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # generator finalized outside the loop
                return
            task = loop.create_task(asyncio.to_thread(fn, **kwargs))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

        def save(completion: str | None, kept: dict[str, Any] | None = None) -> None:
            later(
                self.store.add,
                request_id=request_id,
                tenant_id=tenant_id,
                key_id=key_id,
                model=model,
                request=request,
                completion=completion,
                retention_days=days,
            )
            if kept is not None and self.responses is not None:
                later(
                    self.responses.add,
                    obj=kept,
                    tenant_id=tenant_id,
                    request_id=request_id,
                    model=model,
                    retention_days=days,
                )

        watcher = StreamWatcher() if keep_response and self.responses is not None else None
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._tee(response.body_iterator, save, watcher)  # type: ignore[arg-type]
            return response
        ok = response.status_code == 200
        body = bytes(response.body)
        save(_completion_text(body) if ok else None, completed_response(body) if ok and watcher else None)
        return response

    @staticmethod
    async def _tee(
        inner: AsyncIterator[Any],
        save: Callable[[str | None, dict[str, Any] | None], None],
        watcher: StreamWatcher | None,
    ) -> AsyncIterator[Any]:
        parts: list[str] = []
        size = 0
        try:
            async for chunk in inner:
                if watcher is not None and isinstance(chunk, bytes | bytearray):
                    watcher.feed(bytes(chunk))
                if size < MAX_TEXT and isinstance(chunk, bytes | bytearray):
                    for line in bytes(chunk).split(b"\n"):
                        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                            continue
                        try:
                            obj = orjson.loads(line[5:])
                        except orjson.JSONDecodeError:
                            continue
                        for ch in obj.get("choices") or [] if isinstance(obj, dict) else []:
                            delta = ch.get("delta") if isinstance(ch, dict) else None
                            text = (
                                delta.get("content")
                                if isinstance(delta, dict)
                                else (ch.get("text") if isinstance(ch, dict) else None)
                            )
                            if isinstance(text, str):
                                parts.append(text)
                                size += len(text)
                yield chunk
        finally:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()
            save("".join(parts)[:MAX_TEXT], watcher.response if watcher is not None else None)
