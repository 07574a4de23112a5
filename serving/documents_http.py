"""How the admin and tenant invoice routes answer a billing document: formats, media types, file names."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import Path
from starlette.responses import Response

PERIOD = r"^\d{4}-\d{2}$"
Number = Annotated[str, Path(min_length=1, max_length=96)]
Format = Literal["json", "csv", "html", "pdf", "ubl"]
MEDIA = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
    "pdf": "application/pdf",
    "ubl": "application/xml",
}
EXTENSION = {"json": "json", "csv": "csv", "html": "html", "pdf": "pdf", "ubl": "xml"}


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status, media_type="application/json")


def document_response(data: bytes, ref: str, fmt: str) -> Response:
    disposition = f'inline; filename="{ref}.{EXTENSION[fmt]}"'
    return Response(data, media_type=MEDIA[fmt], headers={"Content-Disposition": disposition})
