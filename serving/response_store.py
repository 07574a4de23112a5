"""Stored Responses API objects: GET and DELETE /v1/responses/{id}.

vLLM keeps a response for GET only with `VLLM_ENABLE_RESPONSES_API_STORE=1`, in its own memory, never
evicted (its code says so), per worker, and for no tenant in particular. The gateway keeps them
instead: the final response object (the body of a non-streamed call, the `response` of a stream's
last event: `response.completed`, `.incomplete` or `.failed`) is stored only when the tenant turned
content logging on and the request asked to store it (`store`, true by default as in OpenAI's API),
until the tenant's content retention ends (purged with the content log); GET and DELETE see the
calling tenant's responses only. The worker itself is always called with `store: false`, so nothing is
kept on it.

Not served: `previous_response_id` (it needs the conversation on the worker) and
POST /v1/responses/{id}/cancel (background mode needs vLLM's store).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from metering.tenants import to_naive, utcnow
from serving.tables import stored_responses

log = logging.getLogger("tokenport.responses")
MAX_BODY = 4_000_000  # bytes of one stored response object
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")  # the last event of a stream


class ResponseStore:
    """The only stored_responses SQL."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(
        self, obj: dict[str, Any], *, tenant_id: str, request_id: str, model: str, retention_days: int
    ) -> bool:
        rid = obj.get("id")
        body = orjson.dumps(obj)
        if not isinstance(rid, str) or not rid or len(rid) > 128 or len(body) > MAX_BODY:
            return False
        now = utcnow()
        row = {
            "response_id": rid,
            "tenant_id": tenant_id,
            "request_id": request_id,
            "model": model,
            "created_at": to_naive(now),
            "expires_at": to_naive(now + timedelta(days=retention_days)),
            "body": body.decode(),
        }
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(stored_responses).values(**row))
        except IntegrityError:  # the same id twice (a replayed answer): the first one stays
            return False
        return True

    def get(self, tenant_id: str, response_id: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            body = conn.execute(
                select(stored_responses.c.body).where(
                    stored_responses.c.response_id == response_id,
                    stored_responses.c.tenant_id == tenant_id,
                    stored_responses.c.expires_at > to_naive(utcnow()),
                )
            ).scalar_one_or_none()
        return None if body is None else dict(orjson.loads(body))

    def delete(self, tenant_id: str, response_id: str) -> bool:
        with self._engine.begin() as conn:
            gone = conn.execute(
                delete(stored_responses).where(
                    stored_responses.c.response_id == response_id, stored_responses.c.tenant_id == tenant_id
                )
            )
        return bool(gone.rowcount)

    def purge(self) -> int:
        with self._engine.begin() as conn:
            gone = conn.execute(
                delete(stored_responses).where(stored_responses.c.expires_at <= to_naive(utcnow()))
            )
        return int(gone.rowcount or 0)


def completed_response(payload: bytes) -> dict[str, Any] | None:
    """The final response object in an answer: a non-streamed body, or a stream's `response.completed`."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and obj.get("object") == "response" else None


class StreamWatcher:
    """Finds the final response object (`response.completed`, `.incomplete` or `.failed`) in SSE chunks as
    they pass (lines may be split across chunks)."""

    def __init__(self) -> None:
        self._pending = b""
        self.response: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.response is not None:
            return
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()[-MAX_BODY:]
        for line in lines:
            if not line.startswith(b"data:") or not any(t.encode() in line for t in FINAL_EVENTS):
                continue
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("type") in FINAL_EVENTS:
                found = event.get("response")
                if isinstance(found, dict):
                    self.response = found
                    return
