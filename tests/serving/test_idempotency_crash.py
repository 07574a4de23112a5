"""A gateway that dies between the ledger commit and the response head (issue 12).

Commit-before-complete means the event is durable before the first byte leaves: a crash in that
window bills an answer the client never got. The policy (README: Reliability): the request stays
billed (the worker did the work), and a retry with the same Idempotency-Key never runs or bills it
again: once the dead gateway's claim is stale it gets 409 `idempotency_key_consumed` naming the
billed request. A claim whose request never reached the ledger is taken over by the retry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from metering.db import make_engine
from metering.store_sql import UsageStore
from serving import db_schema
from serving.errors import Conflict
from serving.idempotency import Claim, Idempotency, IdempotencyStore
from tests.metering.conftest import make_event

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def stores(tmp_path: Path) -> tuple[IdempotencyStore, UsageStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    db_schema.upgrade(engine)
    return IdempotencyStore(engine), UsageStore(engine)


async def test_a_retry_after_a_crash_between_commit_and_head_is_not_billed_again(
    stores: tuple[IdempotencyStore, UsageStore],
) -> None:
    keys, usage = stores
    idem = Idempotency(keys, usage, stale_after_s=0.0)  # the dead gateway's claim is stale at once
    first = await idem.claim("k-1", "acme", "req_first", "chat.completions", BODY)
    assert isinstance(first, Claim)
    usage.append_batch([make_event("req_first")])  # committed; then the process died: no finish()
    with pytest.raises(Conflict) as info:
        await idem.claim("k-1", "acme", "req_retry", "chat.completions", BODY)
    assert info.value.code == "idempotency_key_consumed"
    assert "req_first" in info.value.message
    assert usage.get("req_retry") is None


async def test_a_retry_takes_over_a_claim_whose_request_was_never_billed(
    stores: tuple[IdempotencyStore, UsageStore],
) -> None:
    keys, usage = stores
    idem = Idempotency(keys, usage, stale_after_s=0.0)
    assert isinstance(await idem.claim("k-2", "acme", "req_lost", "chat.completions", BODY), Claim)
    retry = await idem.claim("k-2", "acme", "req_retry", "chat.completions", BODY)
    assert isinstance(retry, Claim) and retry.request_id == "req_retry"


async def test_a_fresh_claim_is_still_in_progress(stores: tuple[IdempotencyStore, UsageStore]) -> None:
    keys, usage = stores
    idem = Idempotency(keys, usage, stale_after_s=600.0)
    assert isinstance(await idem.claim("k-3", "acme", "req_a", "chat.completions", BODY), Claim)
    usage.append_batch([make_event("req_a")])
    with pytest.raises(Conflict) as info:
        await idem.claim("k-3", "acme", "req_b", "chat.completions", BODY)
    assert info.value.code == "idempotency_request_in_progress"
