"""The Batch API's routes (OpenAI's paths and shapes), with an API key: thin, over BatchService.

POST /v1/files                     multipart: file, purpose=batch
GET  /v1/files/{file_id}           the File object
GET  /v1/files/{file_id}/content   the file's bytes (input, output or error JSONL)
POST /v1/batches                   {input_file_id, endpoint, completion_window: "24h", metadata}
GET  /v1/batches                   ?after=&limit= (newest first)
GET  /v1/batches/{batch_id}
POST /v1/batches/{batch_id}/cancel
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile
from starlette.responses import Response

from serving.batches.service import BatchService, CreateBatch
from serving.deps import PrincipalDep, ServicesDep

router = APIRouter(prefix="/v1", tags=["batches"])
ID = Path(max_length=64)


def batch_service(s: ServicesDep) -> BatchService:
    return s.batches


BatchesDep = Annotated[BatchService, Depends(batch_service)]


@router.post("/files")
async def upload_file(
    who: PrincipalDep,
    svc: BatchesDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form(max_length=32)],
) -> dict[str, Any]:
    return await svc.upload(who.tenant.id, file.filename, purpose, await file.read())


@router.get("/files/{file_id}")
async def get_file(who: PrincipalDep, svc: BatchesDep, file_id: Annotated[str, ID]) -> dict[str, Any]:
    return await svc.file(who.tenant.id, file_id)


@router.get("/files/{file_id}/content")
async def file_content(who: PrincipalDep, svc: BatchesDep, file_id: Annotated[str, ID]) -> Response:
    return Response(await svc.content(who.tenant.id, file_id), media_type="application/octet-stream")


@router.post("/batches")
async def create_batch(who: PrincipalDep, svc: BatchesDep, req: CreateBatch) -> dict[str, Any]:
    return await svc.create(who.tenant.id, who.key_id, req)


@router.get("/batches")
async def list_batches(
    who: PrincipalDep,
    svc: BatchesDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    return await svc.list(who.tenant.id, after, limit)


@router.get("/batches/{batch_id}")
async def get_batch(who: PrincipalDep, svc: BatchesDep, batch_id: Annotated[str, ID]) -> dict[str, Any]:
    return await svc.get(who.tenant.id, batch_id)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(who: PrincipalDep, svc: BatchesDep, batch_id: Annotated[str, ID]) -> dict[str, Any]:
    return await svc.cancel(who.tenant.id, batch_id)
