"""The archive of issued documents' renderings (billing_document_files): SQL only."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from billing.tables import document_files
from metering.clock import to_naive


def get(conn: Connection, document_id: int, fmt: str, status: str) -> bytes | None:
    row = conn.execute(
        select(document_files.c.content, document_files.c.sha256).where(
            document_files.c.document_id == document_id,
            document_files.c.format == fmt,
            document_files.c.status == status,
        )
    ).first()
    if row is None:
        return None
    content = bytes(row[0])
    if hashlib.sha256(content).hexdigest() != row[1]:
        raise ValueError(f"archived {fmt} of document {document_id} does not match its sha256")
    return content


def put(conn: Connection, document_id: int, fmt: str, status: str, content: bytes, now: datetime) -> bytes:
    try:
        with conn.begin_nested():
            conn.execute(
                insert(document_files).values(
                    document_id=document_id,
                    format=fmt,
                    status=status,
                    sha256=hashlib.sha256(content).hexdigest(),
                    content=content,
                    created_at=to_naive(now),
                )
            )
    except IntegrityError:  # another process archived it first: theirs is the document
        kept = get(conn, document_id, fmt, status)
        assert kept is not None
        return kept
    return content
