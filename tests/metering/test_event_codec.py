"""UsageEvent is defined once (metering/events.py) and every form of it is derived from that definition:
the canonical hash form (unchanged for the events already stored), the database row of both append
paths, the spool's JSON, the export, the tenant's download and the usage_events columns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy.engine import Engine

from metering.chain import GENESIS, canonical, chain_hash
from metering.event_codec import EventCodec, codec
from metering.events import Outcome, UsageEvent, width
from metering.recorder import RequestMeter
from metering.schema import event_columns, usage_events
from metering.sqlite_append import COLUMNS
from metering.store_sql import EXPORT_FIELDS, UsageStore, _row
from metering.verify import CANONICAL_FIELDS, event_row, event_row_hash, verify_event_rows

NAMES = tuple(f.name for f in fields(UsageEvent))
CHAIN_COLUMNS = ("recorded_at", "prev_hash", "hash", "tenant_seq")

# Two events and their chain hashes as computed by the code before the codec was derived from the
# dataclass (commit 94cc6ed, metering/chain.py): the canonical form of stored events must never change.
FIXED_A = UsageEvent(
    request_id="req_fixed_1",
    tenant_id="t-acme",
    key_id="key_1",
    model="qwen-0.5b",
    origin_country="DE",
    prompt_tokens=120,
    cached_prompt_tokens=64,
    completion_tokens=37,
    stream=True,
    outcome=Outcome.CLIENT_CANCELLED,
    started_at=datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
    finished_at=datetime(2026, 3, 1, 14, 0, 1, 5, tzinfo=timezone(timedelta(hours=2))),
    endpoint="completions",
    origin_source="header",
    language="de",
    serving_region="eu-west",
    worker_id="w-1",
    estimated=True,
)
FIXED_B = UsageEvent(
    request_id="req_fixed_2",
    tenant_id="t-b",
    key_id="key_2",
    model="m",
    origin_country="ZZ",
    prompt_tokens=0,
    cached_prompt_tokens=0,
    completion_tokens=0,
    stream=False,
    outcome=Outcome.OK,
    started_at=datetime(2026, 1, 1, tzinfo=UTC),
    finished_at=datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
)
HASH_A = "fdd74e1df86d2d733ad7dcce09dbeaaacf75df6c67a4f19e61948589b6792bf0"
HASH_B = "d4769f42e17367c347a25d3eb23170c3b610c9c03dca1dc2832a745676361f14"
CANONICAL_A = (
    b'["req_fixed_1","t-acme","key_1","qwen-0.5b","completions","DE","header","de","eu-west","w-1",120,'
    b'64,37,true,"client_cancelled",true,"2026-03-01T12:00:00.123456Z","2026-03-01T12:00:01.000005Z"]'
)
# A spool line the old code wrote (metering/ledger.py event_to_json, with the unused `extra` field).
OLD_SPOOL_LINE = (
    b'{"request_id":"req_fixed_1","tenant_id":"t-acme","key_id":"key_1","model":"qwen-0.5b","origin_country":"DE",'
    b'"prompt_tokens":120,"cached_prompt_tokens":64,"completion_tokens":37,"stream":true,'
    b'"outcome":"client_cancelled","started_at":"2026-03-01T12:00:00.123456+00:00",'
    b'"finished_at":"2026-03-01T14:00:01.000005+02:00","endpoint":"completions","origin_source":"header",'
    b'"language":"de","serving_region":"eu-west","worker_id":"w-1","estimated":true,"extra":{}}'
)


def test_the_hash_of_existing_events_is_unchanged() -> None:
    assert canonical(FIXED_A) == CANONICAL_A
    assert chain_hash(GENESIS, FIXED_A) == HASH_A
    assert chain_hash(HASH_A, FIXED_B) == HASH_B


def test_a_spool_written_by_the_old_code_is_read() -> None:
    assert codec().from_json(OLD_SPOOL_LINE) == FIXED_A


def test_every_codec_covers_every_field() -> None:
    c = codec()
    assert c.names == NAMES
    assert tuple(c.canonical_fields(FIXED_A)) == NAMES
    sized = replace(FIXED_A, prompt_chars=1, prompt_bytes=2, completion_chars=3, completion_bytes=4)
    assert len(c.canonical(sized)) == len(NAMES)
    assert tuple(c.to_db(FIXED_A)) == NAMES
    assert len(c.sqlite_values(FIXED_A)) == len(NAMES)
    assert tuple(c.to_record(FIXED_A)) == NAMES
    assert (*NAMES, *CHAIN_COLUMNS) == COLUMNS
    assert tuple(_row(FIXED_A, datetime(2026, 1, 1), GENESIS, GENESIS, 1)) == (*NAMES, *CHAIN_COLUMNS)
    assert EXPORT_FIELDS == NAMES
    assert CANONICAL_FIELDS == NAMES
    event_cols = [col.name for col in usage_events.columns if col.name not in ("seq", *CHAIN_COLUMNS)]
    assert tuple(event_cols) == NAMES
    # and back again, to the same event
    assert c.from_record(c.to_record(FIXED_A)) == FIXED_A
    assert c.from_json(c.to_json(FIXED_B)) == FIXED_B
    back = c.from_db(c.to_db(FIXED_A))
    assert back == FIXED_A and back.finished_at.tzinfo is UTC  # the same instants, read back in UTC


def test_the_columns_follow_the_fields_types() -> None:
    for name in NAMES:
        col = usage_events.c[name]
        f = next(f for f in fields(UsageEvent) if f.name == name)
        assert col.nullable is (f.default is None), name
        if "max_length" in f.metadata:
            assert col.type.length == f.metadata["max_length"], name  # type: ignore[attr-defined]
    assert usage_events.c.request_id.unique


def test_a_tenant_recomputes_every_hash_from_its_download(engine: Engine) -> None:
    store = UsageStore(engine)
    store.append_batch([FIXED_A, FIXED_B])
    rows = [event_row(s) for s in store.iter_events()]
    assert [r["hash"] for r in rows] == [HASH_A, HASH_B]
    assert all(event_row_hash(r) == r["hash"] for r in rows)
    assert verify_event_rows(rows).ok


def test_the_meter_carries_every_required_field() -> None:
    meter_fields = {f.name for f in fields(RequestMeter)}
    required = {f.name for f in fields(UsageEvent) if f.default is f.default_factory}  # both MISSING
    assert required - meter_fields == {"outcome", "finished_at"}  # known only when the request ends


@dataclass(frozen=True, slots=True, kw_only=True)
class Extended(UsageEvent):
    """UsageEvent with one more field, as a later change would add it: in one place."""

    priority: str | None = field(default=None, metadata=width(16))


def test_a_field_added_later_reaches_every_form_and_keeps_the_old_hashes() -> None:
    c = EventCodec(Extended)
    plain = Extended(**{n: getattr(FIXED_A, n) for n in NAMES})
    marked = Extended(**{n: getattr(FIXED_A, n) for n in NAMES}, priority="high")
    assert c.canonical(plain) == codec().canonical(FIXED_A)  # the events stored before keep their hashes
    assert c.canonical(marked) == [*codec().canonical(FIXED_A), None, None, None, None, "high"]
    for form in (c.to_db(marked), c.to_record(marked), c.canonical_fields(marked)):
        assert form["priority"] == "high"
    assert c.sqlite_values(marked)[-1] == "high"
    assert c.from_record(c.to_record(marked)) == marked
    assert c.from_db(c.to_db(marked)).priority == "high"  # type: ignore[attr-defined]
    cols = event_columns(Extended)
    assert [col.name for col in cols] == [*NAMES, "priority"]
    assert cols[-1].nullable and cols[-1].type.length == 16  # type: ignore[attr-defined]
