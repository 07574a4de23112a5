"""Idempotency-Key: a client retry never runs (or bills) a request twice.

A tenant that sends `Idempotency-Key: <up to 255 characters>` on a completion gets, for every
later request with the same key (within 24 hours, `metering.idempotency_ttl_s`), the first
request's result instead of a new generation:

- the first request *claims* the key (a row in `idempotency_keys`, inserted under the key's primary
  key, so of several concurrent requests across all gateway processes exactly one wins). The claim
  happens after the request is authenticated and validated, before rate limits and the worker;
- while it runs, a retry gets 409 `idempotency_request_in_progress`;
- when it has finished with an answer (a non-streamed response of any status the worker gave, or a
  stream that reached `data: [DONE]`, or a Responses stream its `response.completed`), the answer's bytes
  are stored and a retry gets them again,
  with the first request's `X-Request-Id` and `Idempotent-Replayed: true`. Nothing is metered;
- when it was refused before any worker ran it, or failed having been billed nothing, the key is
  released and a retry runs normally;
- when it was cut off (the client went away, or the worker failed) after tokens were billed, a
  retry gets 409 `idempotency_key_consumed` naming the first request: send a new key to run again;
- the same key with a different body (or endpoint) is 400 `idempotency_key_reused`;
- a claim older than `stale_after_s` (the request timeout plus a minute) was lost with a gateway
  that died: when its request never reached the ledger, the next retry takes it over; when it did
  (the gateway died between the commit and the response head), it was billed and the retry gets 409
  `idempotency_key_consumed` naming it — never a second bill.

The stored answer is capped (`max_response_bytes`); a larger one is treated as consumed. The
database being unreachable makes requests *with* a key fail with 503 (the guarantee cannot be
kept); requests without a key are unaffected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.types import Message, Send

from metering.recorder import RequestMeter
from metering.store_sql import UsageStore
from metering.tenants import to_aware, to_naive, utcnow
from serving.errors import Conflict, InvalidRequest, ServiceUnavailable
from serving.tables import idempotency_keys

log = logging.getLogger("tokenport.idempotency")
HEADER = "idempotency-key"
DONE_EVENT = b"data: [DONE]\n\n"
RESPONSES_ENDS = (b"event: response.completed\n", b"event: response.incomplete\n")  # a whole Responses stream


def _responses_ended(body: bytes) -> bool:
    """A Responses API stream (no [DONE]) is whole when its last event is a successful terminal one."""
    return body.endswith(b"\n\n") and body[:-2].rsplit(b"\n\n", 1)[-1].startswith(RESPONSES_ENDS)


@dataclass(frozen=True, slots=True)
class Record:
    tenant_id: str
    key: str
    fingerprint: str
    request_id: str
    stream: bool
    state: str  # in_flight | done
    status: int | None
    outcome: str | None
    response: bytes | None
    created_at: datetime


class IdempotencyStore:
    """The only idempotency SQL (table idempotency_keys)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def claim(
        self, tenant_id: str, key: str, fingerprint: str, request_id: str, stream: bool, ttl_s: float
    ) -> Record | None:
        """Claim the key for this request: None if claimed now, else the existing (unexpired) record."""
        now = utcnow()
        row = {
            "tenant_id": tenant_id,
            "key": key,
            "fingerprint": fingerprint,
            "request_id": request_id,
            "stream": stream,
            "state": "in_flight",
            "created_at": to_naive(now),
            "expires_at": to_naive(now + timedelta(seconds=ttl_s)),
        }
        pk = and_(idempotency_keys.c.tenant_id == tenant_id, idempotency_keys.c.key == key)
        for _ in range(3):
            try:
                with self._engine.begin() as conn:
                    conn.execute(
                        delete(idempotency_keys).where(pk, idempotency_keys.c.expires_at < to_naive(now))
                    )
                    conn.execute(insert(idempotency_keys), [row])
                return None
            except IntegrityError:
                with self._engine.connect() as conn:
                    found = conn.execute(select(idempotency_keys).where(pk)).mappings().first()
                if found is not None:
                    return _record(found)
        raise SQLAlchemyError("could not claim the idempotency key")

    def take_over(self, old: Record, request_id: str, ttl_s: float) -> bool:
        """Give a stale in-flight claim to a new request (only if nobody else did first)."""
        now = utcnow()
        with self._engine.begin() as conn:
            res = conn.execute(
                update(idempotency_keys)
                .where(
                    idempotency_keys.c.tenant_id == old.tenant_id,
                    idempotency_keys.c.key == old.key,
                    idempotency_keys.c.request_id == old.request_id,
                    idempotency_keys.c.state == "in_flight",
                )
                .values(
                    request_id=request_id,
                    created_at=to_naive(now),
                    expires_at=to_naive(now + timedelta(seconds=ttl_s)),
                )
            )
            return bool(res.rowcount)

    def finish(
        self,
        tenant_id: str,
        key: str,
        request_id: str,
        *,
        status: int,
        outcome: str | None,
        response: bytes | None,
    ) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(idempotency_keys)
                .where(
                    idempotency_keys.c.tenant_id == tenant_id,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.request_id == request_id,
                )
                .values(
                    state="done",
                    status=status,
                    outcome=outcome,
                    response=response,
                    completed_at=to_naive(utcnow()),
                )
            )

    def release(self, tenant_id: str, key: str, request_id: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.tenant_id == tenant_id,
                    idempotency_keys.c.key == key,
                    idempotency_keys.c.request_id == request_id,
                )
            )

    def purge(self) -> int:
        with self._engine.begin() as conn:
            res = conn.execute(
                delete(idempotency_keys).where(idempotency_keys.c.expires_at < to_naive(utcnow()))
            )
            return int(res.rowcount or 0)


def _record(m: Any) -> Record:
    created = to_aware(m["created_at"])
    assert created is not None
    return Record(
        tenant_id=m["tenant_id"],
        key=m["key"],
        fingerprint=m["fingerprint"],
        request_id=m["request_id"],
        stream=bool(m["stream"]),
        state=m["state"],
        status=m["status"],
        outcome=m["outcome"],
        response=bytes(m["response"]) if m["response"] is not None else None,
        created_at=created,
    )


def fingerprint(endpoint: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(
        endpoint.encode() + b"\n" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


@dataclass(slots=True)
class Claim:
    """A key this request holds; what it answers is captured on the way out (`capture`)."""

    tenant_id: str
    key: str
    request_id: str
    stream: bool
    cap: int  # bytes of answer kept (Idempotency.max_response_bytes)
    status: int | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    ended: bool = False

    def capture(self, send: Send) -> Send:
        """`send`, keeping the status and the bytes of the answer (JSON or streamed) to store them."""

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
            elif message["type"] == "http.response.body":
                part = bytes(message.get("body", b""))
                self.size += len(part)
                if self.size <= self.cap:
                    self.chunks.append(part)
                if not message.get("more_body", False):
                    self.ended = True
            await send(message)

        return watch


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored answer of a finished request with this key, to send again."""

    request_id: str  # the metered request's id (X-Request-Id of the replay)
    status: int
    body: bytes
    stream: bool

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        media = b"text/event-stream; charset=utf-8" if self.stream else b"application/json"  # as first sent
        return [
            (b"content-type", media),
            (b"content-length", str(len(self.body)).encode()),
            (b"idempotent-replayed", b"true"),
        ]


class Idempotency:
    def __init__(
        self,
        store: IdempotencyStore,
        usage: UsageStore,
        *,
        ttl_s: float = 86_400.0,
        stale_after_s: float = 660.0,
        max_response_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.usage = usage
        self.ttl_s = ttl_s
        self.stale_after_s = stale_after_s
        self.max_response_bytes = max_response_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self._purger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._purger = asyncio.create_task(self._purge_loop(), name="idempotency-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def claim(
        self, header: str, tenant_id: str, request_id: str, endpoint: str, body: dict[str, Any]
    ) -> Claim | Replay:
        """Claim the request's Idempotency-Key (`header`): a Claim to run it, a Replay when a retry
        must not run again; Conflict / InvalidRequest / ServiceUnavailable otherwise."""
        key = header.strip()
        if not key or len(key) > 255:
            raise InvalidRequest(
                "Idempotency-Key must be 1 to 255 characters.",
                param="Idempotency-Key",
                code="invalid_idempotency_key",
            )
        fp = fingerprint(endpoint, body)
        stream = bool(body.get("stream"))
        try:
            existing = await asyncio.to_thread(
                self.store.claim, tenant_id, key, fp, request_id, stream, self.ttl_s
            )
            lost = (
                existing is not None
                and existing.state == "in_flight"
                and existing.fingerprint == fp
                and (utcnow() - existing.created_at).total_seconds() > self.stale_after_s
            )
            if lost and existing is not None:  # its gateway died: billed (crash after the commit) or not
                if await asyncio.to_thread(self.usage.get, existing.request_id) is not None:
                    raise Conflict(
                        f"The request with this Idempotency-Key ({existing.request_id}) was billed, but "
                        "its gateway stopped before answering; send a new Idempotency-Key to run it "
                        "again.",
                        code="idempotency_key_consumed",
                    )
                if await asyncio.to_thread(self.store.take_over, existing, request_id, self.ttl_s):
                    log.warning(
                        "idempotency key of %s taken over from lost request %s",
                        tenant_id,
                        existing.request_id,
                    )
                    existing = None
        except SQLAlchemyError as exc:
            raise ServiceUnavailable(
                "Requests with an Idempotency-Key cannot be accepted right now (the ledger "
                "database is unavailable); retry shortly.",
                code="idempotency_unavailable",
            ) from exc
        if existing is None:
            return Claim(tenant_id, key, request_id, stream, self.max_response_bytes)
        if existing.fingerprint != fp:
            raise InvalidRequest(
                "This Idempotency-Key was already used with a different request body; "
                "use a new key for a new request.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        if existing.state == "in_flight":
            raise Conflict(
                f"A request with this Idempotency-Key ({existing.request_id}) is still running; "
                "retry when it has finished.",
                code="idempotency_request_in_progress",
            )
        if existing.response is None or existing.status is None:
            raise Conflict(
                f"The request with this Idempotency-Key ({existing.request_id}) ended without a "
                f"complete answer ({existing.outcome or 'unknown'}) and was billed; send a new "
                "Idempotency-Key to run it again.",
                code="idempotency_key_consumed",
            )
        return Replay(existing.request_id, existing.status, existing.response, existing.stream)

    def finish(self, claim: Claim, meter: RequestMeter | None) -> None:
        """Store the captured answer, consume the key, or release it (see the module docstring)."""
        status = claim.status if claim.ended else None
        body = b"".join(claim.chunks) if claim.ended and claim.size <= claim.cap else None
        complete = (
            status is not None
            and body is not None
            and (not claim.stream or status != 200 or body.endswith(DONE_EVENT) or _responses_ended(body))
        )
        billed = meter is not None and meter.recorded and (meter.prompt_tokens + meter.completion_tokens) > 0
        worker_answered = meter is not None and meter.recorded
        if status == 503:  # refused by the gateway (no worker, ledger unavailable): nothing was billed
            self._spawn(self.store.release, claim.tenant_id, claim.key, claim.request_id)
        elif complete and worker_answered and status is not None and status < 500:
            stored = body if body is not None and len(body) <= self.max_response_bytes else None
            self._spawn(
                self.store.finish,
                claim.tenant_id,
                claim.key,
                claim.request_id,
                status=status,
                outcome="ok" if status == 200 else "rejected",
                response=stored,
            )
        elif billed:
            self._spawn(
                self.store.finish,
                claim.tenant_id,
                claim.key,
                claim.request_id,
                status=status or 0,
                outcome="cut_off",
                response=None,
            )
        else:
            self._spawn(self.store.release, claim.tenant_id, claim.key, claim.request_id)

    def _spawn(self, fn: Any, *args: Any, **kw: Any) -> None:
        async def run() -> None:
            try:
                await asyncio.to_thread(fn, *args, **kw)
            except SQLAlchemyError as exc:
                log.error("idempotency store: %s failed: %s", fn.__name__, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                await asyncio.to_thread(self.store.purge)
            except SQLAlchemyError as exc:
                log.warning("idempotency purge failed: %s", exc)
