"""Database lifecycle: the combined schema of all packages and running Alembic migrations.

The migration history is one linear chain: 0001 -> 0002_guardrails -> 0002_metering -> 0002_billing
-> later revisions. The three 0002 revisions used to be three heads off 0001, so a database may be
stamped at all three, or at any subset of them. `linearize_stamps` (run by serving/migrations/env.py
before every migration run, in the same transaction) rewrites such stamps to the one revision of the
chain up to which everything is applied; the 0002 revisions skip their DDL when their tables exist
already, so nothing is created twice.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, Engine

from metering.schema import metadata as metering_metadata
from serving.batches.tables import metadata as batches_metadata
from serving.tables import metadata as serving_metadata

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# The former branches (each revised 0001), in the order of the linear chain.
FORMER_BRANCHES = ("0002_guardrails", "0002_metering", "0002_billing")


def _combined() -> MetaData:
    combined = MetaData()
    for md in (metering_metadata, serving_metadata, batches_metadata):
        for table in md.tables.values():
            table.to_metadata(combined)
    try:  # billing's tables, once billing has a store
        from billing.store import metadata as billing_metadata
    except ImportError:
        return combined
    for table in billing_metadata.tables.values():
        table.to_metadata(combined)
    return combined


target_metadata = _combined()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema (safe to run at every start)."""
    cfg = alembic_config(str(engine.url.render_as_string(hide_password=False)))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def linearize_stamps(conn: Connection) -> None:
    """Rewrite stamps of the former three-headed history (any subset of FORMER_BRANCHES, each of which
    only implied 0001) to one revision of the linear chain: the last one up to which every revision
    is applied. The revisions after it run next and skip the DDL that is there already."""
    if not inspect(conn).has_table("alembic_version"):
        return
    stamped = {str(r) for r in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()}
    if not stamped or not stamped <= {"0001", *FORMER_BRANCHES}:
        return  # a fresh database, or one on the linear chain after the former branches
    if len(stamped) == 1 and stamped <= {"0001", FORMER_BRANCHES[0]}:
        return  # a prefix of the chain already
    position = "0001"
    for revision in FORMER_BRANCHES:
        if revision not in stamped:
            break
        position = revision
    conn.execute(text("DELETE FROM alembic_version"))
    conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": position})
