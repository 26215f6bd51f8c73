"""The console's files (server/console): served at /ui from a fixed table, linked from /,
reachable without an API key (they hold no data), with a Content-Security-Policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterserve.server.config import Settings
from adapterserve.server.console import CSP, STATIC_DIR, build_router, is_console_path, load_files
from adapterserve.server.main import create_app

KEY = "user-key"


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Never entered as a context manager: no lifespan, no engine; the console needs neither.
    return TestClient(create_app(Settings(api_key=KEY, admin_api_key="admin-key")))


def test_root_links_to_the_console_without_a_key(client: TestClient) -> None:
    for path in ("/", "/ui"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"] == "/ui/"


def test_index_and_assets_need_no_key_and_carry_the_csp(client: TestClient) -> None:
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "script-src 'self'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert '<script type="module" src="js/main.js">' in page.text
    for asset, kind in (("console.css", "text/css"), ("js/main.js", "text/javascript")):
        response = client.get(f"/ui/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)


def test_the_api_still_needs_the_key(client: TestClient) -> None:
    for path in ("/v1/models", "/metrics", "/uix", "/v1/ui/"):
        response = client.get(path)
        assert response.status_code == 401, path


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../server/config.py",
        "/ui/%2e%2e/config.py",
        "/ui/js/../../__init__.py",
        "/ui/__init__.py",
        "/ui/nothing.js",
        "/ui//etc/passwd",
        "/ui/js/",
    ],
)
def test_only_the_files_in_the_table_are_served(client: TestClient, path: str) -> None:
    """The client may normalise '..' away (then the path is outside /ui and needs the key)."""
    response = client.get(path)
    assert response.status_code in (401, 404), (path, response.text[:200])
    assert "import" not in response.text


def test_every_asset_is_in_the_table_and_no_page_uses_inner_html() -> None:
    files = load_files()
    assert {"index.html", "console.css", "js/main.js", "js/api.js"} <= files.keys()
    on_disk = {p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()}
    assert on_disk == set(files)  # nothing committed that is not served (or the reverse)
    for name, static in files.items():
        text = static.body.decode()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, (name, sink)
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text  # no CDN: the page works offline


def test_links_are_not_served(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>ok</p>")
    (tmp_path / "secret.js").symlink_to(Path(__file__))
    assert set(load_files(tmp_path)) == {"index.html"}
    assert build_router(tmp_path).routes


def test_console_paths() -> None:
    assert all(is_console_path(p) for p in ("/", "/ui", "/ui/", "/ui/js/main.js"))
    assert not any(is_console_path(p) for p in ("/uix", "/v1/models", "/metrics", "//ui"))
