"""Durable on-disk adapter store: one directory per adapter under `root/<name>/`.

Uploads are unpacked into a fresh staging directory inside the root (`root/.staging/<uuid>`),
validated there, and moved into place with a directory rename (same filesystem, so atomic).
Nothing is ever written outside the staging directory of the upload in progress:

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

Refusals are the typed errors of adapters.errors (InvalidUploadError, UploadTooLargeError,
InvalidNameError, AdapterExistsError, AdapterLimitError, UnknownAdapterError), each with the
`param` at fault; messages never contain a server path.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import os
import re
import shutil
import stat
import tarfile
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapterserve.adapters.errors import (
    AdapterExistsError,
    AdapterLimitError,
    InvalidNameError,
    InvalidUploadError,
    UnknownAdapterError,
    UploadTooLargeError,
)
from adapterserve.adapters.formats import (
    ALLOWED_FILES,
    pickle_only,
    pickle_only_message,
    shown_names,
)

__all__ = ["StoredAdapter", "AdapterStore", "NAME_RE", "validate_name"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHUNK = 1 << 20
DEFAULT_MAX_MEMBERS = 64
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz")
_STAGING = ".staging"
_REPLACED = ".replaced"  # old versions moved aside during a replace (restored after a crash)
_DELETED = ".deleted"  # deleted adapters moved aside before removal (purged after a crash)
_LOCK = ".lock"  # flock'ed by whoever changes the store or recovers it (processes share a root)
# A staging directory untouched this long is a crashed upload's; younger ones may be another
# process's upload in progress (cluster replicas share the store) and are left alone.
STAGING_STALE_S = 3600.0
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    path: Path
    size_bytes: int
    created: float  # directory mtime, seconds since the epoch


def _show(text: str, limit: int = 80) -> str:
    """A client-supplied name, truncated and quoted, safe to put in a message."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name or "\x00" in name:
        shown = _show(name) if isinstance(name, str) else type(name).__name__
        raise InvalidNameError(
            "name",
            f"invalid adapter name {shown}: expected 1-64 characters of letters, digits, '.', "
            "'_' or '-', starting with a letter or digit, without '..'",
        )
    return name


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
        raise InvalidUploadError("files", f"unexpected file name {_show(filename)}: {e}") from None
    if not parts:
        raise InvalidUploadError("files", f"unexpected file name {_show(filename)}: not a file")
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
        return InvalidUploadError(
            "archive",
            f"archive member {_show(member)} refused: {why}; expected {sorted(ALLOWED_FILES)} "
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


def _stale(entry: Path) -> bool:
    """Whether nothing in a staging entry (itself, or a file directly in it) changed within
    STAGING_STALE_S."""
    try:
        times = [entry.lstat().st_mtime]
        if entry.is_dir() and not entry.is_symlink():
            times += [child.lstat().st_mtime for child in entry.iterdir()]
    except OSError:
        return False
    return time.time() - max(times) > STAGING_STALE_S


class _StoreLock:
    """The store's changes (commit, delete) and its crash recovery, one at a time: across this
    process's threads (a lock) and across the processes that share the root (an exclusive flock
    on `root/.lock`: the replicas of a cluster)."""

    def __init__(self, root: Path) -> None:
        self._thread, self._path, self._fd = threading.Lock(), root / _LOCK, -1

    def __enter__(self) -> _StoreLock:
        self._thread.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            self._thread.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.close(self._fd)  # closing drops the flock
        finally:
            self._fd = -1
            self._thread.release()


class AdapterStore:
    def __init__(
        self,
        root: Path,
        max_upload_bytes: int,
        max_adapters: int | None = None,
        *,
        max_extracted_bytes: int | None = None,
        max_archive_members: int = DEFAULT_MAX_MEMBERS,
    ):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.max_upload_bytes = max_upload_bytes
        self.max_adapters = max_adapters
        self.max_extracted_bytes = (
            max_upload_bytes if max_extracted_bytes is None else max_extracted_bytes
        )
        self.max_archive_members = max_archive_members
        self._lock = _StoreLock(self.root)
        self._recover()

    # ---- crash recovery -------------------------------------------------------------------
    def _recover(self) -> None:
        """Drop stale staging and leftover deletions; put back an old version whose replace
        crashed. Under the store's lock, so that a process starting beside others that share
        the root never sees a replace or delete half done; staging younger than
        STAGING_STALE_S may be another process's upload in progress and stays."""
        with self._lock:
            staging = self.root / _STAGING
            for entry in staging.iterdir() if staging.is_dir() else ():
                if _stale(entry):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()
            shutil.rmtree(self.root / _DELETED, ignore_errors=True)
            replaced = self.root / _REPLACED
            if replaced.is_dir():
                for holder in replaced.iterdir():
                    for old in holder.iterdir() if holder.is_dir() else ():
                        dest = self.root / old.name
                        if NAME_RE.fullmatch(old.name) and not os.path.lexists(dest):
                            os.rename(old, dest)
                shutil.rmtree(replaced, ignore_errors=True)
            staging.mkdir(exist_ok=True)

    # ---- staging --------------------------------------------------------------------------
    def new_staging(self) -> Path:
        staging = self.root / _STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        return staging

    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """A fresh staging directory inside the root; removed on exit unless committed."""
        staging = self.new_staging()
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(self._own_staging(staging), ignore_errors=True)

    def _own_staging(self, staging: Path) -> Path:
        staging = Path(staging)
        if staging.is_symlink() or staging.resolve().parent != self.root / _STAGING:
            raise ValueError("not a staging directory of this store")
        return staging

    @contextlib.contextmanager
    def _cleanup_on_error(self, staging: Path) -> Iterator[None]:
        try:
            yield
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # ---- uploads --------------------------------------------------------------------------
    def add_files(self, staging: Path, files: Iterable[tuple[str, BinaryIO]]) -> list[str]:
        """Store the uploaded files that the allow-list names (bare names, total bytes capped);
        other safe names are dropped, unread and unwritten. Returns the dropped names."""
        staging = self._own_staging(staging)
        with self._cleanup_on_error(staging):
            budget = [self.max_upload_bytes]
            kept: set[str] = set()
            ignored: list[str] = []
            for filename, stream in files:
                name = _kept_file_name(filename)
                if name is None:
                    ignored.append(filename)
                    continue
                if name in kept:
                    raise InvalidUploadError("files", f"duplicate file {_show(name)}")
                kept.add(name)
                _write_capped(
                    staging / name, stream, budget, "files", "upload", self.max_upload_bytes
                )
            return _settle_kept(kept, ignored, "files")

    def add_archive(self, staging: Path, filename: str, stream: BinaryIO) -> list[str]:
        """Unpack one .zip / .tar.gz / .tgz archive into `staging` after checking every member.
        Returns the members dropped (files outside the adapter's allow-listed ones)."""
        staging = self._own_staging(staging)
        with self._cleanup_on_error(staging):
            lower = filename.lower() if isinstance(filename, str) else ""
            if lower.endswith(ZIP_SUFFIXES):
                kind = "zip"
            elif lower.endswith(TAR_SUFFIXES):
                kind = "tar"
            else:
                shown = _show(filename) if isinstance(filename, str) else "?"
                raise InvalidUploadError(
                    "archive", f"unsupported archive {shown}: expected .zip, .tar.gz or .tgz"
                )
            # The archive itself lives beside the staging dir while it is unpacked.
            archive = staging.with_name(staging.name + ".upload")
            try:
                _write_capped(
                    archive, stream, [self.max_upload_bytes], "archive", "upload",
                    self.max_upload_bytes,
                )  # fmt: skip
                extractor = _Extractor(staging, self.max_extracted_bytes, self.max_archive_members)
                if kind == "zip":
                    self._unzip(archive, extractor)
                else:
                    self._untar(archive, extractor)
                return extractor.finish()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    archive.unlink()

    def _unzip(self, archive: Path, extractor: _Extractor) -> None:
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
                        f"archive expands to {declared} bytes: expected at most "
                        f"{extractor.max_bytes}",
                    )
                for info in wanted:
                    with zf.open(info) as member:
                        extractor.file(info.filename, member)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError):
            raise InvalidUploadError("archive", "unreadable zip archive") from None
        except NotImplementedError:
            raise InvalidUploadError("archive", "unsupported zip compression method") from None

    def _untar(self, archive: Path, extractor: _Extractor) -> None:
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
                            f"archive contents too large: expected at most "
                            f"{extractor.max_bytes} bytes",
                        )
                    data = tf.extractfile(member)
                    if data is None:  # pragma: no cover - isreg() members always have data
                        raise extractor.refuse(member.name, "no data")
                    extractor.file(member.name, data)
        except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError):
            raise InvalidUploadError("archive", "unreadable .tar.gz archive") from None

    # ---- committed adapters ---------------------------------------------------------------
    def _names(self) -> list[str]:
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if NAME_RE.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
        )

    def commit(self, staging: Path, name: str, replace: bool = False) -> Path:
        """Move a filled staging directory to `root/<name>` (AdapterExistsError on a duplicate,
        AdapterLimitError when the store is full)."""
        staging = self._own_staging(staging)
        with self._cleanup_on_error(staging):
            validate_name(name)
            dest = self.root / name
            with self._lock:
                exists = os.path.lexists(dest)
                if exists and not replace:
                    raise AdapterExistsError(
                        "name", f"adapter {name!r} already exists: pass replace=true"
                    )
                if (
                    not exists
                    and self.max_adapters is not None
                    and len(self._names()) >= self.max_adapters
                ):
                    raise AdapterLimitError(
                        "name",
                        f"the store is full ({self.max_adapters} adapters): delete one first",
                    )
                if not exists:
                    os.rename(staging, dest)
                else:
                    holder = self.root / _REPLACED / uuid.uuid4().hex
                    holder.mkdir(parents=True)
                    aside = holder / name
                    os.rename(dest, aside)
                    try:
                        os.rename(staging, dest)
                    except BaseException:
                        os.rename(aside, dest)
                        raise
                    shutil.rmtree(holder, ignore_errors=True)
                self._fsync_root()
        return dest

    def _fsync_root(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def delete(self, name: str) -> None:
        validate_name(name)
        with self._lock:
            dest = self.root / name
            if not dest.is_dir() or dest.is_symlink():
                raise UnknownAdapterError("name", f"adapter {name!r} not found")
            holder = self.root / _DELETED / uuid.uuid4().hex
            holder.mkdir(parents=True)
            os.rename(dest, holder / name)
            self._fsync_root()
        shutil.rmtree(holder, ignore_errors=True)

    def exists(self, name: str) -> bool:
        try:
            self.path(name)
        except (InvalidNameError, UnknownAdapterError):
            return False
        return True

    def stamp(self, name: str) -> tuple[int, ...] | None:
        """What identifies the committed folder of `name` (None when there is none): every
        commit renames a fresh staging folder into place, so a replace changes it. Processes
        that share the store (cluster replicas) compare stamps to see each other's changes."""
        try:
            validate_name(name)
            info = os.lstat(self.root / name)
        except (InvalidNameError, OSError):
            return None
        if not stat.S_ISDIR(info.st_mode):
            return None
        return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns)

    def path(self, name: str) -> Path:
        validate_name(name)
        dest = self.root / name
        if not dest.is_dir() or dest.is_symlink():
            raise UnknownAdapterError("name", f"adapter {name!r} not found")
        return dest

    def list(self) -> list[StoredAdapter]:
        out = []
        for name in self._names():
            path = self.root / name
            try:
                size = sum(
                    entry.lstat().st_size for entry in path.iterdir() if not entry.is_symlink()
                )
                created = path.stat().st_mtime
            except FileNotFoundError:  # deleted meanwhile
                continue
            out.append(StoredAdapter(name, path, size, created))
        return out
