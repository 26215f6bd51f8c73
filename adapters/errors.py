"""Typed refusals of the adapters package: each names the field at fault and says what to change.

They carry no HTTP status: the server maps each type to one (server/api/errors.py, ADAPTER_ERRORS),
so that `adapters` never speaks HTTP. Messages never contain a server path.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterLimitError",
    "AdapterLoadError",
    "AdapterPathNotFoundError",
    "InvalidNameError",
    "InvalidPathError",
    "InvalidUploadError",
    "NoAdapterRootsError",
    "NoAdapterStoreError",
    "PathNotAllowedError",
    "UnknownAdapterError",
    "UploadTooLargeError",
]


class AdapterError(Exception):
    """A refused adapter operation; `param` names the request field, config field or file at
    fault (None when no one field is)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param
        self.message = message

    def __reduce__(self):
        # Rebuilt from (param, message): a cluster replica hands these to the ingress (pickle
        # of our own objects between our own processes; never user data).
        return type(self), (self.param, self.message)


class AdapterFormatError(AdapterError, ValueError):
    """An adapter directory that we refuse; `param` names the offending config field or file."""


class UnknownAdapterError(AdapterError):
    """No adapter of that name (registered, or in the store)."""


class AdapterExistsError(AdapterError):
    """The name is taken (by an adapter without replace=true, or by the base model)."""


class AdapterLimitError(AdapterError):
    """The store holds as many adapters as it may: delete one first."""


class NoAdapterStoreError(AdapterError):
    """This server was started without a durable store, so it takes no uploads."""


class InvalidNameError(AdapterError):
    """An adapter name outside NAME_RE (adapters.store)."""


class InvalidUploadError(AdapterError):
    """Uploaded files or an archive we refuse: unsafe names, links, no adapter files..."""


class UploadTooLargeError(AdapterError):
    """An upload, or what its archive expands to, beyond the configured caps."""


class InvalidPathError(AdapterError):
    """A client-supplied adapter path that names no directory path, or not a directory."""


class AdapterPathNotFoundError(AdapterError):
    """A client-supplied adapter path that does not exist."""


class PathNotAllowedError(AdapterError):
    """A client-supplied adapter path outside every configured adapter root."""


class NoAdapterRootsError(PathNotAllowedError):
    """A client-supplied adapter path on a server with no adapter roots configured at all."""


class AdapterLoadError(AdapterError):
    """A registered adapter's files could not be read back (changed or removed underneath)."""
