"""The web console (issue 17): static HTML, CSS and JS under `static/`, served at /ui by the
API's own process. The page talks only to the public HTTP API, with the key its user types in.

The files are read once, when the router is built, into a table keyed by their relative paths:
a request names one of those keys or gets a 404, so no client path ever reaches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/ui"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page loads nothing but its own files and talks only to this origin; no inline script
# or style runs, so an injected element could not execute even if one got in.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str


def load_files(root: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every servable file under `root` by its relative path ('js/api.js'); links are skipped."""
    files = {}
    for path in sorted(root.rglob("*")):
        media_type = CONTENT_TYPES.get(path.suffix)
        if media_type and path.is_file() and not path.is_symlink():
            files[path.relative_to(root).as_posix()] = StaticFile(path.read_bytes(), media_type)
    return files


def is_console_path(path: str) -> bool:
    """The paths that need no API key: the console's files and the link to them at /."""
    return path in ("/", PREFIX) or path.startswith(PREFIX + "/")


def build_router(root: Path = STATIC_DIR) -> APIRouter:
    files = load_files(root)
    router = APIRouter(include_in_schema=False)

    def serve(name: str) -> Response:
        found = files.get(name)
        if found is None:
            return Response("Not found", status_code=404, media_type="text/plain")
        return Response(found.body, media_type=found.media_type, headers=SECURITY_HEADERS)

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/", status_code=307)

    @router.get(PREFIX)
    async def console_bare() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/", status_code=307)

    @router.get(PREFIX + "/")
    async def console_index() -> Response:
        return serve("index.html")

    @router.get(PREFIX + "/{name:path}")
    async def console_file(name: str) -> Response:
        return serve(name)

    return router
