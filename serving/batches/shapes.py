"""OpenAI's Batch API formats: the File and Batch objects, input lines, output and error lines.

Input line:  {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output line: {"id": "batch_req_...", "custom_id": "...",
              "response": {"status_code": 200, "request_id": "req_...", "body": {...}}, "error": null}
A request the gateway or the model refused goes to the error file with its `response` (status_code
4xx/5xx, body {"error": ...}); a line that never became a request (not JSON, no custom_id, wrong url,
cancelled, expired) goes there with `response: null` and `error: {code, message}`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from serving.batches.store import BatchRow, Counts, FileRow, NewLine

MAX_CUSTOM_ID = 512


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def sortable_id(prefix: str) -> str:
    """24 hex digits like new_id, the first 12 the creation time in ms: ids sort by creation."""
    return f"{prefix}{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()  # the pipeline's request id form (serving/pipeline.py)


def file_object(f: FileRow) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(b: BatchRow, counts: Counts | None) -> dict[str, Any]:
    c = counts or Counts(b.total, b.completed, b.failed)
    errors = orjson.loads(b.errors) if b.errors else None
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": None if errors is None else {"object": "list", "data": errors},
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": c.total, "completed": c.completed, "failed": c.failed},
        "metadata": orjson.loads(b.metadata) if b.metadata else None,
    }


def line_id(request_id: str) -> str:
    return "batch_req_" + request_id.removeprefix("req_")


def response_line(custom_id: str | None, request_id: str, status: int, body: Any) -> str:
    return orjson.dumps(
        {
            "id": line_id(request_id),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
    ).decode()


def error_line(custom_id: str | None, request_id: str, code: str, message: str) -> str:
    return orjson.dumps(
        {
            "id": line_id(request_id),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    ).decode()


def parse_input(text: str, endpoint: str) -> list[NewLine]:
    """Every non-blank line of an input file, runnable or already its error line (never an exception)."""
    lines: list[NewLine] = []
    seen: set[str] = set()
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        rid = new_request_id()
        custom_id, body, problem = _check(raw, endpoint, seen)
        if problem is not None:
            lines.append(NewLine(no, custom_id, rid, None, error_line(custom_id, rid, *problem)))
        else:
            lines.append(NewLine(no, custom_id, rid, orjson.dumps(body).decode()))
    return lines


def _check(raw: str, endpoint: str, seen: set[str]) -> tuple[str | None, Any, tuple[str, str] | None]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None, ("invalid_json_line", "This line is not valid JSON.")
    if not isinstance(obj, dict):
        return None, None, ("invalid_json_line", "This line is not a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return (
            None,
            None,
            (
                "missing_custom_id",
                f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters.",
            ),
        )
    if custom_id in seen:
        return custom_id, None, ("duplicate_custom_id", "custom_id is not unique in this file.")
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return custom_id, None, ("invalid_method", 'method must be "POST".')
    if obj.get("url") != endpoint:
        return (
            custom_id,
            None,
            ("mismatched_url", f"url is {obj.get('url')!r}, but this batch's endpoint is {endpoint!r}."),
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        return custom_id, None, ("invalid_body", "body must be a JSON object.")
    return custom_id, body, None
