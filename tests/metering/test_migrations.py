"""One linear Alembic history: one head; a fresh database and databases made by the former
three-headed history (stamped at the three heads, or at any subset) all upgrade to it, and the
schema they end with is the one the table definitions describe."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from metering.db import make_engine
from serving import db_schema

FORMER = db_schema.FORMER_BRANCHES
OLD_ENV = """
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
"""


def _head() -> str:
    heads = ScriptDirectory.from_config(db_schema.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1
    return heads[0]


@pytest.fixture
def old_history(tmp_path: Path) -> Config:
    """The former history: 0001 and the three 0002 revisions, each revising 0001 (three heads)."""
    root = tmp_path / "old_migrations"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(OLD_ENV)
    for path in (db_schema.MIGRATIONS / "versions").glob("000[12]_*.py"):
        source = re.sub(r'down_revision = ["\']0002_\w+["\']', 'down_revision = "0001"', path.read_text())
        (root / "versions" / path.name).write_text(source)
    cfg = Config()
    cfg.set_main_option("script_location", str(root))
    assert sorted(ScriptDirectory.from_config(cfg).get_heads()) == sorted(FORMER)
    return cfg


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    yield e
    e.dispose()


def _old_upgrade(cfg: Config, engine: Engine, *targets: str) -> None:
    for target in targets:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, target)


def _stamps(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(v) for v in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()}


def _schema_diffs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), db_schema.target_metadata)
    return [
        d
        for d in diffs
        if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == "alembic_version")
    ]


def test_the_history_has_one_head() -> None:
    script = ScriptDirectory.from_config(db_schema.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    chain = [r.revision for r in script.walk_revisions()][::-1]
    assert chain[:4] == ["0001", *FORMER]
    for rev in script.walk_revisions():
        assert not rev.is_merge_point and not rev.is_branch_point


def test_a_fresh_database_upgrades_to_the_head(engine: Engine) -> None:
    db_schema.upgrade(engine)
    assert _stamps(engine) == {_head()}
    assert _schema_diffs(engine) == []
    db_schema.upgrade(engine)  # again: nothing to do
    assert _stamps(engine) == {_head()}


@pytest.mark.parametrize(
    "stamped",
    [
        FORMER,
        ("0002_guardrails",),
        ("0002_metering",),
        ("0002_billing",),
        ("0002_guardrails", "0002_billing"),
        ("0002_metering", "0002_billing"),
        ("0002_guardrails", "0002_metering"),
        ("0001",),
    ],
)
def test_a_database_of_the_former_heads_upgrades(
    old_history: Config, engine: Engine, stamped: tuple[str, ...]
) -> None:
    _old_upgrade(old_history, engine, *stamped)
    assert _stamps(engine) == set(stamped)
    with engine.begin() as conn:  # a row made before the upgrade survives it
        conn.execute(
            text(
                "INSERT INTO tenants (id, name, billing_country, business, currency, created_at) "
                "VALUES ('t1', 'T', 'DE', 1, 'EUR', '2026-01-01 00:00:00.000000')"
            )
        )
    db_schema.upgrade(engine)
    assert _stamps(engine) == {_head()}
    assert _schema_diffs(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 1
    assert {"limit_policies", "idempotency_keys", "billing_documents", "usage_events"} <= set(
        inspect(engine).get_table_names()
    )


def test_the_former_heads_upgrade_through_the_alembic_command_too(
    old_history: Config, engine: Engine
) -> None:
    """`alembic upgrade head` (env.py opening its own connection) rewrites the stamps the same way."""
    _old_upgrade(old_history, engine, *FORMER)
    cfg = db_schema.alembic_config(str(engine.url))
    command.upgrade(cfg, "head")
    assert _stamps(engine) == {_head()}
