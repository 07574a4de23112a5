"""Per-event text size (issue 15): characters and UTF-8 bytes of the prompt and of the completion,
on new events and covered by their hash; a ledger written before the fields existed still verifies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from alembic import command
from sqlalchemy import text

from metering.chain import GENESIS, canonical, chain_hash
from metering.db import make_engine
from metering.event_codec import codec
from metering.recorder import RequestMeter, text_size
from metering.store_sql import UsageStore
from metering.verify import verify_chain
from serving import db_schema
from tests.metering.test_event_codec import FIXED_A, FIXED_B, HASH_A, HASH_B

OLD_COLUMNS = (
    "request_id",
    "tenant_id",
    "key_id",
    "model",
    "endpoint",
    "origin_country",
    "origin_source",
    "language",
    "serving_region",
    "worker_id",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "stream",
    "outcome",
    "estimated",
    "started_at",
    "finished_at",
)


def test_text_size_counts_characters_and_utf8_bytes() -> None:
    assert text_size("") == (0, 0)
    assert text_size("hello") == (5, 5)
    assert text_size("Сәлем") == (5, 10)  # Kazakh Cyrillic: two bytes a letter
    assert text_size("你好") == (2, 6)
    assert text_size("😀") == (1, 4)


def test_the_meter_carries_the_sizes_onto_the_event() -> None:
    m = RequestMeter(
        request_id="r",
        tenant_id="t",
        key_id="k",
        model="m",
        endpoint="chat.completions",
        origin_country="DE",
        origin_source="tenant",
        stream=True,
    )
    assert m.event(FIXED_A.outcome).prompt_chars is None  # nothing measured: nothing claimed
    m.measure_prompt("Привет")
    m.add_completion("ab")
    m.add_completion("ç")
    e = m.event(FIXED_A.outcome)
    assert (e.prompt_chars, e.prompt_bytes, e.completion_chars, e.completion_bytes) == (6, 12, 3, 4)


def test_the_hash_covers_the_sizes_of_new_events_only() -> None:
    assert chain_hash(GENESIS, FIXED_A) == HASH_A  # an old event: unchanged
    sized = replace(FIXED_A, prompt_chars=10, prompt_bytes=20, completion_chars=3, completion_bytes=3)
    assert canonical(sized).endswith(b",10,20,3,3]")
    other = replace(sized, completion_bytes=4)
    assert len({chain_hash(GENESIS, sized), chain_hash(GENESIS, other), HASH_A}) == 3
    assert codec().from_json(codec().to_json(sized)) == sized


def test_a_ledger_written_before_the_change_upgrades_and_still_verifies(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = db_schema.alembic_config(str(engine.url))
    with engine.begin() as conn:  # the schema as it was: up to the revision before the new columns
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002_billing")
    with engine.connect() as conn:
        cols = {r[1] for r in conn.execute(text("PRAGMA table_info(usage_events)"))}
    assert "prompt_chars" not in cols
    old = [(FIXED_A, GENESIS, HASH_A), (FIXED_B, HASH_A, HASH_B)]
    with engine.begin() as conn:  # rows as the old code wrote them (only the old columns)
        for event, prev, h in old:
            values = dict(zip(codec().names, codec().sqlite_values(event), strict=True))
            row = {k: v for k, v in values.items() if k in OLD_COLUMNS}
            names = [*row, "recorded_at", "prev_hash", "hash"]
            conn.execute(
                text(
                    f"INSERT INTO usage_events ({', '.join(names)}) VALUES "
                    f"({', '.join(':' + n for n in names)})"
                ),
                {**row, "recorded_at": "2026-03-01 12:00:02.000000", "prev_hash": prev, "hash": h},
            )
    db_schema.upgrade(engine)
    store = UsageStore(engine)
    new = replace(
        FIXED_B,
        request_id="req_new",
        prompt_chars=12,
        prompt_bytes=24,
        completion_chars=0,
        completion_bytes=0,
    )
    store.append_batch([new])
    events = list(store.iter_events())
    assert [s.event.request_id for s in events] == ["req_fixed_1", "req_fixed_2", "req_new"]
    assert events[0].event == FIXED_A and events[0].event.prompt_chars is None
    assert events[2].event.prompt_bytes == 24
    report = verify_chain(events)
    assert report.ok and report.events == 3
    with engine.begin() as conn:  # and an edit of a size is caught
        conn.execute(text("UPDATE usage_events SET prompt_chars = 13 WHERE request_id = 'req_new'"))
    assert verify_chain(list(store.iter_events())).first_break is not None
    store.close()
    engine.dispose()
