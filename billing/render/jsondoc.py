"""JSON rendering: the stable ``to_json_dict`` schema, UTF-8, keys in a fixed order."""

from __future__ import annotations

import json

from billing.documents import CreditNote, Invoice


def to_json(doc: Invoice | CreditNote) -> bytes:
    return json.dumps(doc.to_json_dict(), ensure_ascii=False, indent=2).encode("utf-8") + b"\n"
