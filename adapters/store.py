"""Durable on-disk adapter store: one directory per adapter under `root/<name>/`.

Uploads are written into a fresh staging directory inside the root (`root/.staging/<uuid>`),
checked there (adapters.archive: the allow-list, unsafe names, archive members, size caps), and
moved into place with a directory rename (same filesystem, so atomic). A replace moves the old
version aside first (`root/.replaced`), a delete moves it out (`root/.deleted`); a store that
starts after a crash puts back or purges what it finds there (`_recover`).

Refusals are the typed errors of adapters.errors (InvalidUploadError, UploadTooLargeError,
InvalidNameError, AdapterExistsError, AdapterLimitError, UnknownAdapterError), each with the
`param` at fault; messages never contain a server path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapterserve.adapters.archive import (
    DEFAULT_MAX_MEMBERS,
    show_name,
    unpack_archive,
    write_files,
)
from adapterserve.adapters.errors import (
    AdapterExistsError,
    AdapterLimitError,
    InvalidNameError,
    UnknownAdapterError,
)

__all__ = ["StoredAdapter", "AdapterStore", "NAME_RE", "validate_name"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")  # ":" for ft:<base>:<suffix>:<id>
_STAGING = ".staging"
_REPLACED = ".replaced"  # old versions moved aside during a replace (restored after a crash)
_DELETED = ".deleted"  # deleted adapters moved aside before removal (purged after a crash)
_LOCK = ".lock"  # flock'ed by whoever changes the store or recovers it (processes share a root)
# A staging directory untouched this long is a crashed upload's; younger ones may be another
# process's upload in progress (cluster replicas share the store) and are left alone.
STAGING_STALE_S = 3600.0


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    path: Path
    size_bytes: int
    created: float  # directory mtime, seconds since the epoch


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name or "\x00" in name:
        shown = show_name(name) if isinstance(name, str) else type(name).__name__
        raise InvalidNameError(
            "name",
            f"invalid adapter name {shown}: expected 1-64 characters of letters, digits, '.', "
            "'_', ':' or '-', starting with a letter or digit, without '..'",
        )
    return name


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
        """Store the uploaded files that the allow-list names (adapters.archive.write_files);
        removes `staging` on a refusal. Returns the dropped names."""
        staging = self._own_staging(staging)
        with self._cleanup_on_error(staging):
            return write_files(staging, files, self.max_upload_bytes)

    def add_archive(self, staging: Path, filename: str, stream: BinaryIO) -> list[str]:
        """Unpack one .zip / .tar.gz / .tgz archive into `staging` after checking every member
        (adapters.archive.unpack_archive); removes `staging` on a refusal. Returns the members
        dropped (files outside the adapter's allow-listed ones)."""
        staging = self._own_staging(staging)
        with self._cleanup_on_error(staging):
            return unpack_archive(
                staging,
                filename,
                stream,
                max_upload_bytes=self.max_upload_bytes,
                max_extracted_bytes=self.max_extracted_bytes,
                max_members=self.max_archive_members,
            )

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
