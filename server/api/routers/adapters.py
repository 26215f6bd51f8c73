"""Adapter management: multipart uploads into the durable store, listing, cards, deletion, and
vLLM's load/unload endpoints for adapters already on the server's disk (under its roots).

Uploads never go through FastAPI's form parameters: RequestGuard (server/api/guards.py) hands the
route a receive that counts bytes and stops at the upload cap (413), the form parser spools
file parts to anonymous temporary files that are closed on every path, and the store copies them into a staging
directory of its own (allow-listed names, caps) before the registry validates and commits it.
Files outside the allow-list (a hub download's tokenizer.json, training_args.bin...) are dropped
unwritten and listed in the response's `ignored_files`; unsafe names still refuse the upload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.datastructures import FormData, UploadFile

from adapterserve.adapters.errors import AdapterError, NoAdapterStoreError
from adapterserve.adapters.formats import shown_names
from adapterserve.adapters.registry import AdapterRegistry, Entry
from adapterserve.adapters.store import validate_name
from adapterserve.server.api.deps import get_engine, get_registry, get_settings, require_admin_key
from adapterserve.server.api.errors import (
    APIError,
    error_responses,
    from_adapter_error,
    invalid_request,
)
from adapterserve.server.api.schemas.adapters import (
    ADAPTER_NAME_CHARS,
    ADAPTER_NAME_PATTERN,
    AdapterCard,
    AdapterList,
    AdapterUploadCard,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from adapterserve.server.config import Settings
from adapterserve.server.engine.client import EngineClient
from adapterserve.server.engine.remote import RemoteEntry

log = logging.getLogger(__name__)

router = APIRouter(tags=["adapters"])
admin = [Depends(require_admin_key)]

MAX_FORM_FILES = 8
MAX_FORM_FIELDS = 4
MAX_FIELD_BYTES = 1024
PLAIN_TEXT_OK = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": ADAPTER_NAME_CHARS,
                            "pattern": ADAPTER_NAME_PATTERN,
                            "description": "the adapter's name",
                        },
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "adapter_config.json + adapter_model.safetensors "
                            "(+ README.md); other files are dropped, see ignored_files",
                        },
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "one .zip / .tar.gz / .tgz of those files",
                        },
                    },
                }
            }
        },
    }
}


# ---------------------------------------------------------------- cards and errors


def adapter_card(entry: Entry, base_id: str) -> AdapterCard:
    return AdapterCard(
        id=entry.name,
        name=entry.name,
        parent=base_id,
        kind=entry.kind.value,
        rank=entry.rank,
        targets=list(entry.targets),
        num_virtual_tokens=entry.num_virtual_tokens,
        size_bytes=entry.size_bytes,
        tier=entry.tier,
        origin=entry.origin,
        version=entry.version,
        created=int(entry.created),
        replicas=entry.replicas if isinstance(entry, RemoteEntry) else None,  # a cluster's view
    )


def adapter_api_error(exc: AdapterError, hidden: Iterable[Path] = ()) -> APIError:
    """A registry / store / format refusal in OpenAI's shape (status and code from
    server.errors.ADAPTER_ERRORS), with server folders scrubbed from its message."""
    message = str(exc)
    for folder in hidden:
        message = message.replace(str(folder), "<server>")
    return from_adapter_error(exc, message)


def _hidden_folders(registry: AdapterRegistry, settings: Settings) -> list[Path]:
    folders = [*registry.roots, settings.cache_dir.resolve(), settings.adapter_store.resolve()]
    if registry.store is not None:
        folders.append(registry.store.root)
    return sorted(set(folders), key=lambda p: -len(str(p)))  # longest first: no partial scrubs


async def _run(registry: AdapterRegistry, settings: Settings, work: Any, *args: Any) -> Any:
    """Blocking registry work on a worker thread; its refusals become API errors."""
    try:
        return await asyncio.to_thread(work, *args)
    except AdapterError as exc:
        raise adapter_api_error(exc, _hidden_folders(registry, settings)) from None


# ---------------------------------------------------------------- upload


async def read_upload_form(request: Request) -> FormData:
    """The multipart form; RequestGuard has checked the content type and caps the body
    (413) and its stalls (408) while the parser reads it."""
    return await request.form(
        max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
    )


def _form_parts(form: FormData) -> tuple[str, list[UploadFile], UploadFile | None]:
    """(name, files, archive) from the form, or a 400 that says what the form must hold."""
    unknown = sorted({key for key in form if key not in ("name", "files", "archive")})
    if unknown:
        raise invalid_request(
            f"Unexpected form field {unknown[0][:40]!r}: expected 'name' and either 'files' or "
            "'archive'.",
            unknown[0][:40],
        )
    names = form.getlist("name")
    if len(names) != 1 or not isinstance(names[0], str):
        raise invalid_request("Send exactly one text field 'name' with the adapter's name.", "name")
    files = form.getlist("files")
    archives = form.getlist("archive")
    if any(not isinstance(item, UploadFile) for item in [*files, *archives]):
        raise invalid_request("'files' and 'archive' must be file uploads, not text fields.")
    if bool(files) == bool(archives) or len(archives) > 1:
        raise invalid_request(
            "Send either 'files' (adapter_config.json and adapter_model.safetensors) or exactly "
            "one 'archive' (.zip / .tar.gz), not both and not neither.",
            "files" if files else "archive",
        )
    return names[0], files, archives[0] if archives else None  # type: ignore[return-value]


def _store_upload(
    registry: AdapterRegistry,
    name: str,
    files: list[UploadFile],
    archive: UploadFile | None,
    replace: bool,
) -> tuple[Entry, list[str]]:
    """Stage the uploaded bytes in the store, then validate, commit and serve them.
    Returns the entry and the names the store dropped (outside the allow-list)."""
    store = registry.store
    if store is None:
        raise NoAdapterStoreError(None, "this server has no adapter store")
    with store.stage() as staging:  # removed on exit unless committed (renamed away)
        if archive is not None:
            ignored = store.add_archive(staging, archive.filename or "", archive.file)
        else:
            ignored = store.add_files(staging, [(f.filename or "", f.file) for f in files])
        return registry.add_upload(staging, name, replace), ignored


@router.post(
    "/v1/adapters",
    response_model=AdapterUploadCard,
    status_code=201,
    responses=error_responses(403, 409, 503),
    dependencies=admin,
    openapi_extra=UPLOAD_BODY,
)
async def upload_adapter(
    request: Request,
    replace: bool = Query(False, description="replace an adapter of the same name"),
    registry: AdapterRegistry = Depends(get_registry),
    settings: Settings = Depends(get_settings),
    engine: EngineClient = Depends(get_engine),
) -> AdapterUploadCard:
    form = await read_upload_form(request)
    try:
        name, files, archive = _form_parts(form)
        try:
            validate_name(name)  # before the store stages anything
        except AdapterError as exc:
            raise adapter_api_error(exc) from None
        entry, ignored = await _run(
            registry, settings, _store_upload, registry, name, files, archive, replace
        )
    finally:
        await form.close()
    log.info(
        "adapter %r uploaded (%s, rank %d, version %d); ignored files: %s",
        entry.name,
        entry.kind.value,
        entry.rank,
        entry.version,
        shown_names(ignored),
    )
    card = adapter_card(entry, engine.model_id)
    return AdapterUploadCard(**card.model_dump(), ignored_files=ignored)


# ---------------------------------------------------------------- list, card, delete


@router.get("/v1/adapters", response_model=AdapterList, responses=error_responses(503))
async def list_adapters(
    registry: AdapterRegistry = Depends(get_registry), engine: EngineClient = Depends(get_engine)
) -> AdapterList:
    return AdapterList(data=[adapter_card(e, engine.model_id) for e in registry.list()])


@router.get("/v1/adapters/{name}", response_model=AdapterCard, responses=error_responses(404, 503))
async def get_adapter(
    name: str,
    registry: AdapterRegistry = Depends(get_registry),
    engine: EngineClient = Depends(get_engine),
) -> AdapterCard:
    try:
        entry = registry.get(name)
    except AdapterError as exc:
        raise adapter_api_error(exc) from None
    return adapter_card(entry, engine.model_id)


@router.delete(
    "/v1/adapters/{name}",
    response_model=AdapterCard,
    responses=error_responses(403, 404, 503),
    dependencies=admin,
)
async def delete_adapter(
    name: str,
    registry: AdapterRegistry = Depends(get_registry),
    settings: Settings = Depends(get_settings),
    engine: EngineClient = Depends(get_engine),
) -> AdapterCard:
    """Stop serving `name` (and delete its uploaded files); in-flight requests finish on it."""
    entry = await _run(registry, settings, registry.remove, name)
    log.info("adapter %r deleted (version %d)", entry.name, entry.version)
    return adapter_card(entry, engine.model_id)


# ---------------------------------------------------------------- vLLM compatibility


@router.post(
    "/v1/load_lora_adapter",
    response_class=PlainTextResponse,
    responses={**PLAIN_TEXT_OK, **error_responses(403, 404, 409, 503)},
    dependencies=admin,
)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest,
    registry: AdapterRegistry = Depends(get_registry),
    settings: Settings = Depends(get_settings),
) -> Response:
    """vLLM's endpoint: serve the adapter folder at `lora_path` (under a configured root)."""
    if registry.clustered:  # a path is one machine's; replicas share the store
        raise APIError(
            403,
            "Loading adapters by path is not available on a cluster (--replicas): a path is "
            "one machine's; upload the adapter to POST /v1/adapters.",
            param="lora_path",
        )
    if not registry.roots:
        # Refused before the path is looked at: a 404 here would tell whether it exists.
        raise APIError(
            403,
            "Loading adapters by path is disabled on this server: it has no adapter roots "
            "(start it with --adapter-root DIR), or upload the adapter to POST /v1/adapters.",
            param="lora_path",
        )
    if registry.exists(body.lora_name) and not body.load_inplace:
        raise APIError(
            409,
            f"The adapter {body.lora_name!r} is already loaded; pass load_inplace=true to "
            "replace it.",
            param="lora_name",
        )

    def load() -> Entry:
        return registry.add_path(
            body.lora_name, Path(body.lora_path), replace=body.load_inplace, require_root=True
        )

    try:
        entry = await _run(registry, settings, load)
    except APIError as exc:
        if exc.param == "name":
            exc.param = "lora_name"
        raise
    log.info("adapter %r loaded from a path (version %d)", entry.name, entry.version)
    return PlainTextResponse(f"Success: LoRA adapter '{entry.name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter",
    response_class=PlainTextResponse,
    responses={**PLAIN_TEXT_OK, **error_responses(403, 404, 503)},
    dependencies=admin,
)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest,
    registry: AdapterRegistry = Depends(get_registry),
    settings: Settings = Depends(get_settings),
) -> Response:
    try:
        entry = await _run(registry, settings, registry.remove, body.lora_name)
    except APIError as exc:
        if exc.param in ("name", "model"):
            exc.param = "lora_name"
        raise
    log.info("adapter %r unloaded (version %d)", entry.name, entry.version)
    return PlainTextResponse(f"Success: LoRA adapter '{entry.name}' removed successfully.")
