"""FileStore: OpenAI's Files API for fine-tuning data, kept on disk (issue 27).

Each file is two entries of one folder: `<id>.data` (the bytes as uploaded) and `<id>.json`
(OpenAI's file object, plus our `records`, `format` and `owner`), both written to a temporary
name first and renamed into place, the metadata last: a file exists once its `.json` does. At
start the store reads the folder back (a crash mid-upload leaves temporaries, removed then).

Only purpose `fine-tune` is accepted, and only a training file that
`adapterserve.server.finetune.data.parse_records` reads whole: a bad record refuses the upload,
naming its line, and nothing is stored. A client's file name is metadata only: no path is ever
built from it. Errors are typed (no HTTP); server/api/errors.py maps them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from adapterserve.server.finetune.data import MAX_FILE_BYTES, DataError, Record, parse_records

log = logging.getLogger(__name__)

FINE_TUNE = "fine-tune"
OTHER_PURPOSES = ("assistants", "batch", "vision", "user_data", "evals")  # OpenAI's, not ours
MAX_FILENAME_CHARS = 255
MAX_LIST_LIMIT = 10_000
ID_PREFIX = "file-"
ID_HEX_CHARS = 24
CHUNK_BYTES = 1 << 20
TMP_PREFIX = ".tmp-"


class FileError(Exception):
    """A refusal of the file store; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class InvalidFileError(FileError):
    """The upload cannot be stored: wrong purpose, empty, or not valid training data."""


class FileTooLargeError(FileError):
    """The upload is larger than the store's per-file cap."""


class FileLimitError(FileError):
    """The store holds as many files or bytes as it may."""


class UnknownFileError(FileError):
    """No such file (never created, deleted, or another API key's)."""


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    records: int
    format: str  # "chat" | "completion" | "instruction" | "mixed"
    owner: str | None = None  # fingerprint of the API key that uploaded it (None: keys off)
    order: int = 0  # creation time in ns: newest first even within one second

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's file object, with our `records` and `format`."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "records": self.records,
            "format": self.format,
        }


@dataclass(frozen=True)
class FilePage:
    data: list[StoredFile]
    has_more: bool


def safe_filename(name: str | None) -> str:
    """The client's file name as shown metadata: its last path component, without control,
    format or surrogate characters, at most 255 characters ("upload" when nothing is left)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c for c in base if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co"))
    return kept.strip()[:MAX_FILENAME_CHARS] or "upload"


def record_format(records: Iterable[Record]) -> str:
    kinds = {record.kind for record in records}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def is_file_id(file_id: str) -> bool:
    hex_part = file_id.removeprefix(ID_PREFIX)
    return (
        file_id.startswith(ID_PREFIX)
        and len(hex_part) == ID_HEX_CHARS
        and all(c in "0123456789abcdef" for c in hex_part)
    )


def check_purpose(purpose: str) -> None:
    if purpose == FINE_TUNE:
        return
    shown = repr(purpose[:40])
    raise InvalidFileError(
        f"Purpose {shown} is not accepted here: this server stores only 'fine-tune' files "
        "(training data for fine-tuning jobs).",
        "purpose",
    )


class FileStore:
    """Fine-tuning files under `root`; thread-safe (uploads are stored on worker threads)."""

    def __init__(
        self,
        root: Path,
        max_file_bytes: int = MAX_FILE_BYTES,
        max_files: int = 1024,
        max_total_bytes: int = 16 * 2**30,
    ) -> None:
        self.root = Path(root)
        self.max_file_bytes = min(max_file_bytes, MAX_FILE_BYTES)
        self.max_files, self.max_total_bytes = max_files, max_total_bytes
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._load()

    # ------------------------------------------------------------ create

    def create(
        self,
        source: bytes | BinaryIO,
        filename: str | None,
        purpose: str,
        owner: str | None = None,
    ) -> StoredFile:
        """Check and store one upload (bytes, or a file object read in chunks up to the cap)."""
        check_purpose(purpose)
        file_id = f"{ID_PREFIX}{secrets.token_hex(ID_HEX_CHARS // 2)}"
        tmp_data = self.root / f"{TMP_PREFIX}{file_id}.data"
        try:
            size = self._copy_capped(source, tmp_data)
            records = self._parse(tmp_data, size)
            now = time.time_ns()
            stored = StoredFile(
                id=file_id,
                bytes=size,
                created_at=now // 10**9,
                filename=safe_filename(filename),
                purpose=purpose,
                records=len(records),
                format=record_format(records),
                owner=owner,
                order=now,
            )
            with self._lock:
                self._check_room(size)
                os.replace(tmp_data, self._data_path(file_id))
                self._write_metadata(stored)
                self._files[file_id] = stored
        finally:
            tmp_data.unlink(missing_ok=True)
        log.info("file %s stored (%d bytes, %d records)", file_id, size, stored.records)
        return stored

    def _copy_capped(self, source: bytes | BinaryIO, target: Path) -> int:
        """Write `source` to `target`, refusing it as soon as it passes the cap."""
        if isinstance(source, bytes):
            if len(source) > self.max_file_bytes:
                raise self._too_large()
            target.write_bytes(source)
            return len(source)
        size = 0
        with target.open("wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise self._too_large()
                out.write(chunk)
        return size

    def _too_large(self) -> FileTooLargeError:
        return FileTooLargeError(
            f"The file exceeds {self.max_file_bytes} bytes; split the training data.", "file"
        )

    def _parse(self, path: Path, size: int) -> list[Record]:
        if size == 0:
            raise InvalidFileError("The file is empty: send training records (JSONL).", "file")
        try:
            return parse_records(path.read_bytes())
        except DataError as exc:
            raise InvalidFileError(f"Invalid training file: {exc.message}", "file") from None

    def _check_room(self, size: int) -> None:
        if len(self._files) >= self.max_files:
            raise FileLimitError(
                f"The server holds {len(self._files)} files, its limit; delete some with "
                "DELETE /v1/files/{file_id}.",
                "file",
            )
        held = sum(f.bytes for f in self._files.values())
        if held + size > self.max_total_bytes:
            raise FileLimitError(
                f"Storing {size} more bytes would pass the server's {self.max_total_bytes} "
                f"bytes of files ({held} held); delete some with DELETE /v1/files/{{file_id}}.",
                "file",
            )

    # ------------------------------------------------------------ read, list, delete

    def get(self, file_id: str, caller: str | None = None, admin: bool = True) -> StoredFile:
        """The file `file_id` if it exists and the caller may see it, else UnknownFileError."""
        with self._lock:
            stored = self._files.get(file_id)
        if stored is None or not (admin or (stored.owner is not None and stored.owner == caller)):
            shown = repr(file_id[:64])
            raise UnknownFileError(f"No such File object: {shown}.", "file_id")
        return stored

    def content_path(self, file_id: str, caller: str | None = None, admin: bool = True) -> Path:
        return self._data_path(self.get(file_id, caller, admin).id)

    def content(self, file_id: str, caller: str | None = None, admin: bool = True) -> bytes:
        return self.content_path(file_id, caller, admin).read_bytes()

    def list(
        self,
        purpose: str | None = None,
        limit: int = MAX_LIST_LIMIT,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        caller: str | None = None,
        admin: bool = True,
    ) -> FilePage:
        """The caller's files, newest first by default (OpenAI's order), `limit` of them after
        the file `after` (a cursor: the last id of the previous page)."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidFileError(f"limit must be 1..{MAX_LIST_LIMIT}, got {limit}.", "limit")
        with self._lock:
            files = list(self._files.values())
        visible = [f for f in files if admin or (f.owner is not None and f.owner == caller)]
        visible.sort(key=lambda f: (f.order, f.id), reverse=order == "desc")
        if after is not None:
            ids = [f.id for f in visible]
            if after not in ids:
                raise InvalidFileError(
                    f"after: no such file {after[:64]!r}; pass the last id of the previous page.",
                    "after",
                )
            visible = visible[ids.index(after) + 1 :]
        if purpose is not None:
            visible = [f for f in visible if f.purpose == purpose]
        return FilePage(visible[:limit], len(visible) > limit)

    def delete(self, file_id: str, caller: str | None = None, admin: bool = True) -> StoredFile:
        stored = self.get(file_id, caller, admin)
        with self._lock:
            if self._files.pop(file_id, None) is None:
                raise UnknownFileError(f"No such File object: {file_id!r}.", "file_id")
            self._metadata_path(file_id).unlink(missing_ok=True)  # gone from here on
            self._data_path(file_id).unlink(missing_ok=True)
        log.info("file %s deleted", file_id)
        return stored

    # ------------------------------------------------------------ disk

    def _data_path(self, file_id: str) -> Path:
        assert is_file_id(file_id), file_id  # ids are ours: never a client's string
        return self.root / f"{file_id}.data"

    def _metadata_path(self, file_id: str) -> Path:
        assert is_file_id(file_id), file_id
        return self.root / f"{file_id}.json"

    def _write_metadata(self, stored: StoredFile) -> None:
        body = stored.to_dict() | {"owner": stored.owner, "order": stored.order}
        target = self._metadata_path(stored.id)
        tmp = self.root / f"{TMP_PREFIX}{stored.id}.json"
        with tmp.open("w", encoding="utf-8") as out:
            json.dump(body, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)

    def _load(self) -> None:
        """The files of an earlier run; temporaries and data without metadata are removed."""
        for path in self.root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                _remove(path)
        for path in sorted(self.root.glob(f"{ID_PREFIX}*.json")):
            stored = _read_metadata(path)
            if stored is not None and self._data_path(stored.id).is_file():
                self._files[stored.id] = stored
            else:
                log.warning("file store: %s is unreadable or has no data; skipped", path.name)
        for path in self.root.glob(f"{ID_PREFIX}*.data"):
            if path.stem not in self._files and is_file_id(path.stem):
                _remove(path)  # a delete or an upload cut off between its two renames
        if self._files:
            log.info("file store: %d files in %s", len(self._files), self.root)


def _read_metadata(path: Path) -> StoredFile | None:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        stored = StoredFile(
            id=str(body["id"]),
            bytes=int(body["bytes"]),
            created_at=int(body["created_at"]),
            filename=str(body["filename"]),
            purpose=str(body["purpose"]),
            records=int(body["records"]),
            format=str(body["format"]),
            owner=body.get("owner"),
            order=int(body.get("order", int(body["created_at"]) * 10**9)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stored if is_file_id(stored.id) and path.stem == stored.id else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
