"""An upload's contents, checked and written into its staging directory (adapters.store owns
the staging directory and the commit): an archive unpacked member by member (`unpack_archive`),
or loose files (`write_files`). Nothing is ever written outside that staging directory:

- only the allow-listed names (`adapters.formats.ALLOWED_FILES`) are written; any other file
  with a safe name (a hub download's tokenizer.json, training_args.bin, checkpoint-100/...) is
  dropped unread and unwritten, and its name returned for the response's `ignored_files`; an
  unsafe name (absolute path, drive letter, backslash, `..`, NUL) refuses the whole upload, and
  so do pickle weights without adapter_model.safetensors;
- archives (.zip / .tar.gz / .tgz) are never `extractall`-ed: every member is checked first (no
  unsafe names, links, devices) and the adapter's place settled (`_Extractor`), then only the
  kept members' bytes are read and written by us to `staging/<basename>` with O_EXCL |
  O_NOFOLLOW;
- bytes are counted while streaming (upload cap) and while decompressing (extracted cap and
  member count cap), so a zip / gzip bomb is refused (UploadTooLargeError) before it fills the
  disk; a dropped zip member is never decompressed, a dropped tar member only to skip it
  (counted).

Refusals are InvalidUploadError and UploadTooLargeError (adapters.errors), with the `param` at
fault ("files" or "archive"); messages never contain a server path.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from adapterserve.adapters.errors import InvalidUploadError, UploadTooLargeError
from adapterserve.adapters.formats import (
    ALLOWED_FILES,
    pickle_only,
    pickle_only_message,
    shown_names,
)

__all__ = ["DEFAULT_MAX_MEMBERS", "show_name", "unpack_archive", "write_files"]

CHUNK = 1 << 20
DEFAULT_MAX_MEMBERS = 64
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def show_name(text: str, limit: int = 80) -> str:
    """A client-supplied name, truncated and quoted, safe to put in a message."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def write_files(staging: Path, files: Iterable[tuple[str, BinaryIO]], max_bytes: int) -> list[str]:
    """Write the uploaded files that the allow-list names into `staging` (bare names, at most
    `max_bytes` together); other safe names are dropped, unread and unwritten. Returns the
    dropped names."""
    budget = [max_bytes]
    kept: set[str] = set()
    ignored: list[str] = []
    for filename, stream in files:
        name = _kept_file_name(filename)
        if name is None:
            ignored.append(filename)
            continue
        if name in kept:
            raise InvalidUploadError("files", f"duplicate file {show_name(name)}")
        kept.add(name)
        _write_capped(staging / name, stream, budget, "files", "upload", max_bytes)
    return _settle_kept(kept, ignored, "files")


def unpack_archive(
    staging: Path,
    filename: object,
    stream: BinaryIO,
    *,
    max_upload_bytes: int,
    max_extracted_bytes: int,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[str]:
    """Unpack one .zip / .tar.gz / .tgz archive into `staging` after checking every member: the
    archive at most `max_upload_bytes`, its kept members at most `max_extracted_bytes`
    decompressed, at most `max_members` members. Returns the members dropped (files outside
    the adapter's allow-listed ones)."""
    lower = filename.lower() if isinstance(filename, str) else ""
    if lower.endswith(ZIP_SUFFIXES):
        unpack = _unzip
    elif lower.endswith(TAR_SUFFIXES):
        unpack = _untar
    else:
        shown = show_name(filename) if isinstance(filename, str) else "?"
        raise InvalidUploadError(
            "archive", f"unsupported archive {shown}: expected .zip, .tar.gz or .tgz"
        )
    # The archive itself lives beside the staging dir while it is unpacked.
    archive = staging.with_name(staging.name + ".upload")
    try:
        _write_capped(archive, stream, [max_upload_bytes], "archive", "upload", max_upload_bytes)
        extractor = _Extractor(staging, max_extracted_bytes, max_members)
        unpack(archive, extractor)
        return extractor.finish()
    finally:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()


def _path_parts(name: str) -> list[str]:
    """Components of a client-supplied path (an archive member or a file name); ValueError
    saying why for anything that could escape: empty, NUL, backslash, absolute, '..' or '.'."""
    if not name or "\x00" in name or "\\" in name:
        raise ValueError("empty name, NUL or backslash")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise ValueError("absolute path")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name in ("", "."):
        return []
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("'..', '.' or empty path component")
    return parts


def _kept_file_name(filename: object) -> str | None:
    """An uploaded file's name when the allow-list names it; None (dropped) for another safe
    name; InvalidUploadError for an unsafe one, which refuses the whole upload."""
    if not isinstance(filename, str):
        raise InvalidUploadError("files", f"unexpected file {type(filename).__name__}")
    # ALLOWED_FILES are plain names, but never trust an allow-list to stay that way.
    if filename in ALLOWED_FILES and "/" not in filename and "\\" not in filename:
        return filename
    try:
        parts = _path_parts(filename)
    except ValueError as e:
        raise InvalidUploadError(
            "files", f"unexpected file name {show_name(filename)}: {e}"
        ) from None
    if not parts:
        raise InvalidUploadError("files", f"unexpected file name {show_name(filename)}: not a file")
    return None


def _settle_kept(kept: Iterable[str], ignored: list[str], param: str) -> list[str]:
    """Refuse pickle weights without safetensors, or no adapter file at all; -> `ignored`."""
    kept = set(kept)
    pickles = pickle_only(kept, ignored)
    if pickles:
        raise InvalidUploadError(param, pickle_only_message(pickles))
    if not kept:
        dropped = f"; got only {shown_names(ignored)}" if ignored else ""
        raise InvalidUploadError(
            param, f"no adapter files: expected files named {sorted(ALLOWED_FILES)}{dropped}"
        )
    return [name[:200] for name in ignored]


def _write_capped(
    target: Path, stream: BinaryIO, budget: list[int], param: str, what: str, limit: int
) -> None:
    """Copy `stream` to a new file `target` in chunks; budget[0] is the bytes still allowed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        while True:
            chunk = stream.read(min(CHUNK, budget[0] + 1))
            if not chunk:
                break
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UploadTooLargeError(
                    param, f"{what} too large: expected at most {limit} bytes"
                )
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


class _CappedReader(io.RawIOBase):
    """A read-only stream that raises UploadTooLargeError past `limit` bytes read."""

    def __init__(self, raw: BinaryIO, limit: int):
        self._raw = raw
        self._left = limit
        self._limit = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._left + 1
        data = self._raw.read(min(size, self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise UploadTooLargeError(
                "archive", f"archive expands beyond {self._limit} bytes: refusing it"
            )
        return data

    def readinto(self, buffer) -> int:  # pragma: no cover - tarfile uses read()
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Extractor:
    """Checks an archive's members, settles where the adapter's files are, then writes those.

    First every member is checked (`count`, `check_directory`, `check_file`): a name that could
    escape refuses the whole archive. `settle` then places the adapter: its files are the
    allow-listed names at the top level, else inside the one top-level folder that holds some
    (several such folders: refused). Then `wanted` says which members to write (`file`, to
    `staging/<basename>`); every other file is dropped, unread, and listed in `ignored`.
    """

    def __init__(self, staging: Path, max_bytes: int, max_members: int):
        self.staging = staging
        self.real_staging = staging.resolve()
        self.budget = [max_bytes]
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.members = 0
        self.top_level = False  # some allow-listed name at the top level
        self.folders: set[str] = set()  # top-level folders holding some allow-listed name
        self.location: str | None = None  # after settle(): "" = top level, else the folder
        self.kept: set[str] = set()
        self.ignored: list[str] = []

    @staticmethod
    def refuse(member: str, why: str) -> InvalidUploadError:
        shown = show_name(member)
        return InvalidUploadError(
            "archive",
            f"archive member {shown} refused: {why}; expected {sorted(ALLOWED_FILES)} "
            "at the top level or inside one top-level folder",
        )

    def count(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise UploadTooLargeError(
                "archive", f"archive has too many members: expected at most {self.max_members}"
            )

    def parts(self, member: str) -> list[str]:
        """Path components of a member name; InvalidUploadError for anything that could escape."""
        try:
            return _path_parts(member)
        except ValueError as e:
            raise self.refuse(member, str(e)) from None

    def check_directory(self, member: str) -> None:
        self.parts(member)  # folders decide nothing, but their names must be safe too

    def check_file(self, member: str) -> None:
        parts = self.parts(member)
        if not parts:
            raise self.refuse(member, "not a file name")
        if len(parts) == 1 and parts[0] in ALLOWED_FILES:
            self.top_level = True
        elif len(parts) == 2 and parts[1] in ALLOWED_FILES:
            self.folders.add(parts[0])

    def settle(self) -> None:
        if not self.top_level and len(self.folders) > 1:
            raise InvalidUploadError(
                "archive",
                f"adapter files in several top-level folders {shown_names(sorted(self.folders))}"
                ": expected them at the top level or inside one folder",
            )
        self.location = "" if self.top_level else next(iter(self.folders), None)

    def wanted(self, member: str) -> bool:
        """Whether `member` (a checked file) is one of the adapter's files; else it is dropped."""
        parts = self.parts(member)
        place = "" if len(parts) == 1 else parts[0]
        keep = len(parts) <= 2 and parts[-1] in ALLOWED_FILES and place == self.location
        if not keep:
            self.ignored.append(member)
        return keep

    def file(self, member: str, stream: BinaryIO) -> None:
        base = self.parts(member)[-1]
        if base in self.kept:
            raise self.refuse(member, "duplicate file")
        self.kept.add(base)
        target = self.staging / base
        real = target.resolve()
        if real.parent != self.real_staging or not real.is_relative_to(self.real_staging):
            raise self.refuse(member, "resolves outside the upload")
        _write_capped(target, stream, self.budget, "archive", "archive contents", self.max_bytes)

    def finish(self) -> list[str]:
        return _settle_kept(self.kept, self.ignored, "archive")


def _check_zip_member(info: zipfile.ZipInfo, extractor: _Extractor) -> bool:
    """Refuse links, special files, encryption and unsafe names; -> whether it is a file."""
    extractor.count()
    fmt = stat.S_IFMT((info.external_attr >> 16) & 0xFFFF)
    if fmt == stat.S_IFLNK:
        raise extractor.refuse(info.filename, "symbolic link")
    if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise extractor.refuse(info.filename, "not a regular file")
    if info.flag_bits & 0x1:
        raise extractor.refuse(info.filename, "encrypted")
    if info.is_dir() or fmt == stat.S_IFDIR:
        if info.file_size:
            raise extractor.refuse(info.filename, "folder with content")
        extractor.check_directory(info.filename)
        return False
    extractor.check_file(info.filename)
    return True


def _check_tar_member(member: tarfile.TarInfo, extractor: _Extractor) -> None:
    """Refuse links, devices, fifos, sparse files and unsafe names."""
    extractor.count()
    if member.issym() or member.islnk():
        raise extractor.refuse(member.name, "link")
    if member.isdir():
        extractor.check_directory(member.name)
    elif not member.isreg() or member.sparse is not None:
        raise extractor.refuse(member.name, "device, fifo or special file")
    else:
        extractor.check_file(member.name)


def _tar_members(
    archive: Path, extractor: _Extractor
) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The members of a .tar.gz, read as a stream through a capped reader, so that neither
    member data (dropped members are decompressed to be skipped) nor pax headers can expand
    past the limit before we notice."""
    overhead = (extractor.max_members + 4) * 2048 + tarfile.RECORDSIZE
    with gzip.open(archive, "rb") as gz:
        capped = _CappedReader(gz, extractor.max_bytes + overhead)
        with tarfile.open(fileobj=capped, mode="r|") as tf:
            while (member := tf.next()) is not None:
                yield member, tf


def _unzip(archive: Path, extractor: _Extractor) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > extractor.max_members:
                extractor.members = len(infos) - 1
                extractor.count()
            files = [info for info in infos if _check_zip_member(info, extractor)]
            extractor.settle()
            wanted = [info for info in files if extractor.wanted(info.filename)]
            declared = sum(info.file_size for info in wanted)  # dropped ones stay compressed
            if declared > extractor.max_bytes:
                raise UploadTooLargeError(
                    "archive",
                    f"archive expands to {declared} bytes: expected at most {extractor.max_bytes}",
                )
            for info in wanted:
                with zf.open(info) as member:
                    extractor.file(info.filename, member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError):
        raise InvalidUploadError("archive", "unreadable zip archive") from None
    except NotImplementedError:
        raise InvalidUploadError("archive", "unsupported zip compression method") from None


def _untar(archive: Path, extractor: _Extractor) -> None:
    """Two passes over the stream: check every member and settle the layout, then write the
    wanted ones (a tar.gz has no index; both passes are capped, see _tar_members)."""
    try:
        for member, _ in _tar_members(archive, extractor):
            _check_tar_member(member, extractor)
        extractor.settle()
        for member, tf in _tar_members(archive, extractor):
            if member.isreg() and extractor.wanted(member.name):
                if member.size > extractor.budget[0]:
                    raise UploadTooLargeError(
                        "archive",
                        f"archive contents too large: expected at most {extractor.max_bytes} bytes",
                    )
                data = tf.extractfile(member)
                if data is None:  # pragma: no cover - isreg() members always have data
                    raise extractor.refuse(member.name, "no data")
                extractor.file(member.name, data)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError):
        raise InvalidUploadError("archive", "unreadable .tar.gz archive") from None
