"""Issued PDFs and UBL are rendered once, at finalization (and the VOID-marked ones at void), and kept:
what is served later is those bytes, whatever changed in templates, wording or fonts since (issue 13)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from month_world import World, make_world
from sqlalchemy import func, select

from billing.tables import document_files
from metering.clock import Period

DEC = Period(2025, 12)


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def test_issued_pdf_and_ubl_are_archived_and_served_unchanged(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.svc.archive = True  # as serving/services.py wires it
    world.use("kz-bank", date(2025, 12, 5), prompt=1_000_000)
    world.clock.now = datetime(2026, 1, 2, 9, tzinfo=UTC)
    world.svc.run(DEC)
    [row] = world.svc.finalize(DEC).finalized
    with world.engine.connect() as conn:
        kept = conn.execute(
            select(document_files.c.format, document_files.c.status).where(
                document_files.c.document_id == row.id
            )
        ).all()
    assert sorted(kept) == [("pdf", "finalized"), ("ubl", "finalized")]  # rendered at finalization
    pdf, ubl = world.svc.render(row.ref, "pdf"), world.svc.render(row.ref, "ubl")

    calls: list[str] = []

    def changed(doc: object, fmt: str) -> bytes:  # templates changed since: a different rendering
        calls.append(fmt)
        return b"re-rendered"

    monkeypatch.setattr("billing.documents_view.render", changed)
    assert world.svc.render(row.ref, "pdf") == pdf and world.svc.render(row.ref, "ubl") == ubl
    assert calls == []  # served from the archive, not re-rendered
    assert world.svc.render(row.ref, "html") == b"re-rendered"  # HTML is a view, not the issued document
    monkeypatch.undo()

    voided, note = world.svc.void(row.ref, reason="wrong tax id")
    void_pdf = world.svc.render(voided.ref, "pdf")
    assert void_pdf != pdf  # the VOID-marked one, archived beside the original
    with world.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(document_files)).scalar_one()
    assert n == 5  # the invoice's pdf+ubl as issued and its VOID pdf, the credit note's pdf+ubl
    assert world.svc.render(voided.ref, "ubl") == ubl  # UBL has no void state: the one issued
    assert world.svc.render(note.ref, "pdf").startswith(b"%PDF")
