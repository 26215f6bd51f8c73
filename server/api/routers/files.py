"""OpenAI's Files API for fine-tuning data (issue 27): upload, list, read and delete training
files in the durable FileStore (server/finetune/files.py), so that `openai` clients work unchanged.

The upload never goes through FastAPI's form parameters, as the adapter upload
(server/api/routers/adapters.py): RequestGuard caps the body at `max_file_bytes` (+ framing;
413) and its stalls (408), the form parser spools the file part to an anonymous temporary file,
and the store copies it to its own folder with the same cap, then checks every record
(`parse_records`) on a worker thread; a bad record is a 400 naming its line, and nothing is
stored. A key sees only the files it uploaded (the admin key sees all); another key's file is a
404, worded as for one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import FormData, UploadFile

from adapterserve.server.api.deps import caller_key, is_admin
from adapterserve.server.api.errors import error_responses, file_error, invalid_request
from adapterserve.server.api.schemas.files import (
    LIST_LIMIT_DESCRIPTION,
    FileDeleted,
    FileList,
    FileObject,
)
from adapterserve.server.finetune.files import (
    MAX_LIST_LIMIT,
    FileError,
    FileStore,
    StoredFile,
    UnknownFileError,
    check_purpose,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["files"])

FORM_FIELDS = ("file", "purpose")
MAX_FORM_FIELDS = 4
MAX_FIELD_BYTES = 1024
FileId = Path(..., description="a file id: `file-` and 24 hex digits")
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "training records: JSON Lines (OpenAI chat, "
                            "prompt/completion, or instruction/input/output) or one JSON array",
                        },
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}
CONTENT_OK = {
    200: {
        "description": "the file's bytes as uploaded",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def get_file_store(request: Request) -> FileStore:
    return request.app.state.files


def _file_body(stored: StoredFile) -> dict[str, Any]:
    return stored.to_dict()


def _owner(request: Request) -> dict[str, Any]:
    return {"caller": caller_key(request), "admin": is_admin(request)}


async def _stored(work: Any, *args: Any, **kwargs: Any) -> Any:
    """Store work on a worker thread (file copies, parsing), its refusals as API errors."""
    try:
        return await asyncio.to_thread(work, *args, **kwargs)
    except FileError as exc:
        raise file_error(exc) from None


def _form_parts(form: FormData) -> tuple[UploadFile, str]:
    """(file, purpose) from the form, or a 400 that says what the form must hold."""
    unknown = sorted(key for key in form if key not in FORM_FIELDS)
    if unknown:
        raise invalid_request(
            f"Unexpected form field {unknown[0][:40]!r}: expected 'file' and 'purpose'.",
            unknown[0][:40],
        )
    purposes = form.getlist("purpose")
    if len(purposes) != 1 or not isinstance(purposes[0], str):
        raise invalid_request("Send exactly one text field 'purpose': 'fine-tune'.", "purpose")
    files = form.getlist("file")
    if len(files) != 1 or not isinstance(files[0], UploadFile):
        raise invalid_request("Send exactly one file part 'file' with the training data.", "file")
    return files[0], purposes[0]


@router.post(
    "/v1/files",
    response_model=FileObject,
    responses=error_responses(409),
    openapi_extra=UPLOAD_BODY,
)
async def create_file(
    request: Request, store: FileStore = Depends(get_file_store)
) -> dict[str, Any]:
    """Upload a training file (purpose `fine-tune`); it is checked whole before it is stored."""
    form = await request.form(
        max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
    )
    try:
        upload, purpose = _form_parts(form)
        try:
            check_purpose(purpose)  # before a byte of the file is copied
        except FileError as exc:
            raise file_error(exc) from None
        stored = await _stored(
            store.create, upload.file, upload.filename, purpose, caller_key(request)
        )
    finally:
        await form.close()
    return _file_body(stored)


@router.get("/v1/files", response_model=FileList, responses=error_responses(400))
async def list_files(
    request: Request,
    purpose: str | None = Query(None, max_length=64, description="only files of this purpose"),
    limit: int = Query(MAX_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT, description=LIST_LIMIT_DESCRIPTION),
    after: str | None = Query(
        None, max_length=64, description="a cursor: the last id of the previous page"
    ),
    order: Literal["asc", "desc"] = Query("desc", description="by created_at; newest first"),
    store: FileStore = Depends(get_file_store),
) -> dict[str, Any]:
    """The files this API key uploaded (every file for the admin key), newest first."""
    try:
        page = store.list(purpose, limit, after, order, **_owner(request))
    except FileError as exc:
        raise file_error(exc) from None
    data = [_file_body(f) for f in page.data]
    return {
        "object": "list",
        "data": data,
        "has_more": page.has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _get(store: FileStore, request: Request, file_id: str) -> StoredFile:
    try:
        return store.get(file_id, **_owner(request))
    except FileError as exc:
        raise file_error(exc) from None


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=error_responses(404))
async def retrieve_file(
    request: Request, file_id: str = FileId, store: FileStore = Depends(get_file_store)
) -> dict[str, Any]:
    return _file_body(_get(store, request, file_id))


@router.get(
    "/v1/files/{file_id}/content",
    response_class=FileResponse,
    responses={**CONTENT_OK, **error_responses(404)},
)
async def file_content(
    request: Request, file_id: str = FileId, store: FileStore = Depends(get_file_store)
) -> FileResponse:
    """The file's bytes as uploaded."""
    path = store.content_path(_get(store, request, file_id).id)
    if not path.is_file():  # deleted meanwhile
        raise file_error(UnknownFileError(f"No such File object: {file_id!r}.", "file_id"))
    return FileResponse(path, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=error_responses(404))
async def delete_file(
    request: Request, file_id: str = FileId, store: FileStore = Depends(get_file_store)
) -> dict[str, Any]:
    stored = await _stored(store.delete, file_id, **_owner(request))
    return {"id": stored.id, "object": "file", "deleted": True}
