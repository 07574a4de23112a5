"""The Batch API's operations for one tenant: files (upload, read) and batches (create, read, list,
cancel). Checks and OpenAI's objects here; SQL in store.py, bytes in the file store, running in runner.py.

Upload checks the file as a whole (purpose `batch`, size, UTF-8, 1..max_lines non-blank lines); each
line is validated when the batch runs (validating phase), and a bad line goes to the batch's error
file instead of failing the upload or the batch. Another tenant's file or batch is a 404, exactly as
one that does not exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from serving.batches import shapes
from serving.batches.files import FileStore
from serving.batches.store import BatchRow, BatchStore, FileRow
from serving.errors import BodyTooLarge, Conflict, InvalidRequest, NotFound
from serving.settings import BatchSettings

WINDOW_S = {"24h": 24 * 3600}
ACTIVE = ("validating", "in_progress", "cancelling", "finalizing")


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=8)
    metadata: dict[str, str] | None = None


class BatchService:
    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        settings: BatchSettings,
        endpoints: Callable[[], Collection[str]],
        wake: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.files = files
        self.settings = settings
        self.endpoints = endpoints  # the route table's paths a batch may target
        self.wake = wake
        self.clock = clock

    # --- files ---------------------------------------------------------------------------------
    async def upload(self, tenant_id: str, filename: str | None, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidRequest(f"purpose {purpose!r} is not supported: only 'batch'.", param="purpose")
        if len(data) > self.settings.max_file_bytes:
            raise BodyTooLarge(f"The file is larger than {self.settings.max_file_bytes} bytes.", param="file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                "The file is not UTF-8 text (JSONL).", param="file", code="invalid_file"
            ) from exc
        lines = sum(1 for line in text.splitlines() if line.strip())
        if lines == 0:
            raise InvalidRequest("The file has no lines.", param="file", code="invalid_file")
        if lines > self.settings.max_lines:
            raise InvalidRequest(
                f"The file has {lines} lines, more than {self.settings.max_lines}.",
                param="file",
                code="invalid_file",
            )
        fid = shapes.new_id("file-")
        name = (filename or "upload.jsonl").replace("/", "_").replace("\\", "_")[-255:] or "upload.jsonl"
        row = FileRow(fid, tenant_id, purpose, name, len(data), int(self.clock()), fid)
        await asyncio.to_thread(self.files.put, fid, data)
        await asyncio.to_thread(self.store.insert_file, row)
        return shapes.file_object(row)

    async def _file(self, tenant_id: str, file_id: str) -> FileRow:
        row = await asyncio.to_thread(self.store.get_file, tenant_id, file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
        return row

    async def file(self, tenant_id: str, file_id: str) -> dict[str, Any]:
        return shapes.file_object(await self._file(tenant_id, file_id))

    async def content(self, tenant_id: str, file_id: str) -> bytes:
        row = await self._file(tenant_id, file_id)
        try:
            return await asyncio.to_thread(self.files.get, row.storage_key)
        except OSError as exc:
            raise NotFound(
                f"The content of {file_id} is gone.", param="file_id", code="file_not_found"
            ) from exc

    # --- batches -------------------------------------------------------------------------------
    async def create(self, tenant_id: str, key_id: str, req: CreateBatch) -> dict[str, Any]:
        allowed = sorted(self.endpoints())
        if req.endpoint not in allowed:
            raise InvalidRequest(
                f"endpoint {req.endpoint!r} is not supported; use one of {allowed}.", param="endpoint"
            )
        if req.completion_window not in WINDOW_S:
            raise InvalidRequest("completion_window must be '24h'.", param="completion_window")
        meta = req.metadata
        if meta is not None and (len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items())):
            raise InvalidRequest(
                "metadata takes at most 16 pairs, keys up to 64 and values up to 512 characters.",
                param="metadata",
            )
        f = await self._file(tenant_id, req.input_file_id)
        if f.purpose != "batch":
            raise InvalidRequest(
                f"The file {f.id} has purpose {f.purpose!r}, not 'batch'.", param="input_file_id"
            )
        now = int(self.clock())
        row = BatchRow(
            id=shapes.sortable_id("batch_"),
            tenant_id=tenant_id,
            key_id=key_id,
            endpoint=req.endpoint,
            input_file_id=f.id,
            completion_window=req.completion_window,
            status="validating",
            metadata=None if meta is None else orjson.dumps(meta).decode(),
            errors=None,
            output_file_id=None,
            error_file_id=None,
            total=0,
            completed=0,
            failed=0,
            created_at=now,
            expires_at=now + WINDOW_S[req.completion_window],
        )
        await asyncio.to_thread(self.store.insert_batch, row)
        self.wake()
        return shapes.batch_object(row, None)

    async def _batch(self, tenant_id: str, batch_id: str) -> BatchRow:
        row = await asyncio.to_thread(self.store.get_batch, batch_id, tenant_id)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        return row

    async def _objects(self, rows: list[BatchRow]) -> list[dict[str, Any]]:
        live = [r.id for r in rows if r.status in ACTIVE]
        counts = await asyncio.to_thread(self.store.counts, live) if live else {}
        return [shapes.batch_object(r, counts.get(r.id) if r.status in ACTIVE else None) for r in rows]

    async def get(self, tenant_id: str, batch_id: str) -> dict[str, Any]:
        return (await self._objects([await self._batch(tenant_id, batch_id)]))[0]

    async def list(self, tenant_id: str, after: str | None, limit: int) -> dict[str, Any]:
        rows = await asyncio.to_thread(self.store.list_batches, tenant_id, after=after, limit=limit + 1)
        data = await self._objects(rows[:limit])
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }

    async def cancel(self, tenant_id: str, batch_id: str) -> dict[str, Any]:
        row = await self._batch(tenant_id, batch_id)
        if row.status in ("validating", "in_progress"):
            moved = await asyncio.to_thread(
                self.store.transition,
                row.id,
                ["validating", "in_progress"],
                "cancelling",
                cancelling_at=int(self.clock()),
            )
            if moved:
                self.wake()
        elif row.status not in ("cancelling", "cancelled"):
            raise Conflict(
                f"Cannot cancel a batch with status {row.status!r}.",
                param="batch_id",
                code="batch_not_cancellable",
            )
        return await self.get(tenant_id, batch_id)
