"""Database lifecycle: the combined schema of all packages and running Alembic migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine

from metering.schema import metadata as metering_metadata

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _combined() -> MetaData:
    combined = MetaData()
    for md in (metering_metadata,):
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
        command.upgrade(cfg, "heads")
