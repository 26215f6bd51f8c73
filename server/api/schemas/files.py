"""OpenAI's Files API for fine-tuning data (issue 27): POST/GET /v1/files,
GET /v1/files/{file_id}[/content], DELETE /v1/files/{file_id}; OpenAI's shapes, plus the
file object's `records` and `format`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from adapterserve.server.finetune.files import FINE_TUNE, MAX_FILENAME_CHARS, MAX_LIST_LIMIT

FILE_ID_PATTERN = r"^file-[0-9a-f]{24}$"


class FileObject(BaseModel):
    """OpenAI's file object; `status` is always `processed`: a file is checked before it is
    stored, and a bad one is refused then."""

    id: str = Field(..., pattern=FILE_ID_PATTERN)
    object: Literal["file"] = "file"
    bytes: int = Field(..., ge=1)
    created_at: int = Field(..., description="Unix seconds")
    filename: str = Field(..., max_length=MAX_FILENAME_CHARS)
    purpose: Literal["fine-tune"] = FINE_TUNE
    status: Literal["processed"] = "processed"
    status_details: None = None
    records: int = Field(..., ge=1, description="training records in the file")
    format: Literal["chat", "completion", "instruction", "mixed"] = Field(
        ..., description="the records' kind, or `mixed`"
    )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str = Field(..., pattern=FILE_ID_PATTERN)
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


LIST_LIMIT_DESCRIPTION = f"files per page, 1..{MAX_LIST_LIMIT} (default {MAX_LIST_LIMIT})"
