"""Issue 11's attacks, each a regression test: bodies refused by content type before they are
read, stalled or trickled bodies and slow headers cut off (slowloris, with raw sockets),
connection caps and the probe headroom past them (issue 24),
the SIGTERM drain that keeps answering 503, and who may do what with which key."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapterserve.server.config import Settings
from adapterserve.server.main import create_app
from tests.server.conftest import API_KEY, Server, start_server, stop_server

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.0
BODY_GRACE_S = 1.5
BODY_MIN_RATE = 200  # bytes/s
BODY_DEADLINE_S = 4.0


def raw_request(
    server: Server, head: str, body: bytes = b"", source: str = "127.0.0.1", timeout_s: float = 10.0
) -> socket.socket:
    """A connected socket from `source` that has sent `head` (+ `body`)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect((host, int(port)))
    sock.sendall(head.encode() + body)
    return sock


def read_status(sock: socket.socket) -> tuple[int | None, bytes]:
    """(status, whole response) once the server answers; (None, b"") when it just closes."""
    data = b""
    try:
        while not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return None, b""
    return int(data.split(b" ", 2)[1]), data


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def post_head(path: str, content_type: str, length: int, key: str | None = API_KEY) -> str:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )


# ---------------------------------------------------------------- bodies (rows 13, 22)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/completions", "multipart/form-data; boundary=x"),
        ("/v1/chat/completions", "text/plain"),
        ("/v1/adapters", "application/json"),
        ("/v1/files", "application/jsonl"),
    ],
)
def test_wrong_content_type_is_415_before_the_body_is_read(
    server: Server, path: str, content_type: str
) -> None:
    """1 GiB declared, 100 bytes sent: the answer comes at once, without waiting for (or
    buffering) the rest. A JSON route sent as multipart used to buffer the whole body."""
    sock = raw_request(server, post_head(path, content_type, 2**30), b"x" * 100, timeout_s=5)
    with sock:
        status, response = read_status(sock)
    assert status == 415, response
    assert b'"code":"unsupported_content_type"' in response


def test_body_cap_holds_while_reading_a_chunked_body(server: Server) -> None:
    """No Content-Length (chunked): the cap holds while the bytes arrive."""

    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield b'{"prompt": "' + b"a" * 4096

    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as http:
        response = http.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"


# ---------------------------------------------------------------- slow clients (row 23)


@pytest.fixture(scope="module")
def guarded_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("guarded") / "server.log",
        "--http-header-timeout-s",
        str(HEADER_TIMEOUT_S),
        "--http-body-timeout-s",
        str(BODY_TIMEOUT_S),
        "--http-body-grace-s",
        str(BODY_GRACE_S),
        "--http-body-min-rate",
        str(BODY_MIN_RATE),
        "--http-body-deadline-s",
        str(BODY_DEADLINE_S),
        "--max-connections",
        "40",
        "--max-connections-per-client",
        "20",
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def trickle(
    sockets: list[socket.socket], stop: threading.Event, every_s: float = 0.5, data: bytes = b"X"
) -> None:
    """A slowloris: `data` (one more header or body byte) on every socket, every `every_s`."""
    while not stop.wait(every_s):
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.send(data)


@contextlib.contextmanager
def trickling(
    sockets: list[socket.socket], every_s: float = 0.5, data: bytes = b"X"
) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=trickle, args=(sockets, stop, every_s, data), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_slowloris_is_cut_off_and_real_clients_are_served(guarded_server: Server) -> None:
    attackers = [
        raw_request(
            guarded_server,
            "GET /health HTTP/1.1\r\nHost: a\r\nX-Slow: ",
            source="127.0.0.2",
            timeout_s=HEADER_TIMEOUT_S + 5,
        )
        for _ in range(25)
    ]
    stop = threading.Event()
    thread = threading.Thread(target=trickle, args=(attackers, stop), daemon=True)
    thread.start()
    opened = time.monotonic()
    try:
        # past the per-client cap (20): refused at once with 503, not left hanging
        refused = [read_status(sock)[0] for sock in attackers[20:]]
        assert refused == [503] * 5, refused
        started = time.monotonic()
        with httpx.Client(base_url=guarded_server.base_url, timeout=10) as http:
            assert http.get("/health").status_code == 200
        assert time.monotonic() - started < 2
        # the 20 trickling connections are answered 408 and closed after the header timeout
        outcomes = [read_status(sock)[0] for sock in attackers[:20]]
        assert outcomes == [408] * 20, outcomes
        assert time.monotonic() - opened < HEADER_TIMEOUT_S + 4
    finally:
        stop.set()
        thread.join()
        for sock in attackers:
            sock.close()


def test_connection_cap_keeps_the_server_reachable(guarded_server: Server) -> None:
    """40 idle connections from two addresses fill the cap: a new client's request is refused
    with 503 at once (not left without an answer), its /health is served through the probe
    headroom, and its requests are served again once the header timeout frees the cap."""
    idle = [
        raw_request(guarded_server, "", source=source)
        for source in ("127.0.0.3", "127.0.0.4")
        for _ in range(20)
    ]
    try:
        time.sleep(0.2)
        with httpx.Client(base_url=guarded_server.base_url, timeout=10) as http:
            first = http.get("/v1/models")
            assert first.status_code == 503 and first.headers["retry-after"] == "1", first.text
            assert "open connections" in first.json()["error"]["message"]
            assert http.get("/health").status_code == 200
            deadline = time.monotonic() + HEADER_TIMEOUT_S + 4
            while http.get("/v1/models").status_code != 200:
                assert time.monotonic() < deadline, "the cap never freed up"
                time.sleep(0.2)
    finally:
        for sock in idle:
            sock.close()


def test_a_stalled_body_is_408(guarded_server: Server) -> None:
    sock = raw_request(
        guarded_server,
        post_head("/v1/completions", "application/json", 100, None),
        b'{"prompt": ',
        timeout_s=BODY_TIMEOUT_S + 5,
    )
    with sock:
        started = time.monotonic()
        status, response = read_status(sock)
    assert status == 408, response
    assert b'"code":"body_timeout"' in response
    assert time.monotonic() - started < BODY_TIMEOUT_S + 3


def test_a_trickled_body_is_cut_off_after_the_grace(guarded_server: Server) -> None:
    """A byte every half second never stalls a read for BODY_TIMEOUT_S, which was the only
    timer: such a body held its connection until its declared length arrived (1000 bytes,
    over 8 minutes). Under the minimum rate once the grace is spent: 408, logged, closed."""
    sock = raw_request(
        guarded_server,
        post_head("/v1/completions", "application/json", 1000, None),
        b"{",
        timeout_s=BODY_GRACE_S + 10,
    )
    started, port = time.monotonic(), sock.getsockname()[1]
    with sock, trickling([sock]):
        status, response = read_status(sock)
    assert status == 408, response
    assert b'"code":"body_timeout"' in response and b"bytes/s" in response
    assert time.monotonic() - started < BODY_GRACE_S + 3
    assert any(
        f"closing the connection of 127.0.0.1:{port}" in line and "bytes/s" in line
        for line in guarded_server.log().splitlines()
    ), guarded_server.log()[-2000:]


def test_a_body_at_the_minimum_rate_still_has_a_deadline(guarded_server: Server) -> None:
    """400 bytes/s is over the minimum rate, but a body declared at 1 MB does not arrive within
    BODY_DEADLINE_S at that rate: 408 at the deadline, not when its last byte would come."""
    sock = raw_request(
        guarded_server,
        post_head("/v1/completions", "application/json", 10**6, None),
        b"{",
        timeout_s=BODY_DEADLINE_S + 10,
    )
    started = time.monotonic()
    with sock, trickling([sock], every_s=0.25, data=b" " * 100):
        status, response = read_status(sock)
    elapsed = time.monotonic() - started
    assert status == 408, response
    assert f"within {BODY_DEADLINE_S:g} s".encode() in response
    assert BODY_DEADLINE_S - 0.5 < elapsed < BODY_DEADLINE_S + 3


@pytest.fixture(scope="module")
def crowded_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Default connection caps (512 in all, 256 per address, 16 for probes); a body grace long
    enough that the trickling connections are still held on a slow machine (by default they
    are cut off after 10 s, benchmarks/slow_clients.py)."""
    srv = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("crowded") / "server.log",
        "--http-body-grace-s",
        "120",
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def test_two_addresses_at_their_cap_do_not_lock_out_health_and_ready(
    crowded_server: Server,
) -> None:
    """2 x 256 connections trickling request bodies (a byte every 2 s) fill max_connections. A third address's probes still answer 200 (they
    were 503); its other requests, and more connections from the two, get the cap's 503. One
    address holds at most PROBES_PER_CLIENT connections of the headroom."""
    head = post_head("/v1/completions", "application/json", 1000, None)
    held = [
        raw_request(crowded_server, head, b"{", source=source)
        for source in ("127.0.0.2", "127.0.0.3")
        for _ in range(256)
    ]
    try:
        with trickling(held, every_s=2.0):
            more = raw_request(crowded_server, "", source="127.0.0.2")
            assert read_status(more)[0] == 503
            time.sleep(0.2)
            with httpx.Client(
                base_url=crowded_server.base_url,
                timeout=5,
                transport=httpx.HTTPTransport(local_address="127.0.0.4"),
            ) as http:
                assert http.get("/health").status_code == 200
                assert http.get("/ready").status_code == 200
                other = http.get("/v1/models")
                assert other.status_code == 503, other.text
                assert "open connections" in other.json()["error"]["message"]
            probes = [raw_request(crowded_server, "", source="127.0.0.5") for _ in range(3)]
            assert read_status(probes[2])[0] == 503  # PROBES_PER_CLIENT = 2
            for probe in probes[:2]:
                probe.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                assert read_status(probe)[0] == 200
            for probe in probes:
                probe.close()
            more.close()
    finally:
        for sock in held:
            sock.close()


# ---------------------------------------------------------------- drain (row 18)


def test_sigterm_drain_answers_503_while_in_flight_requests_finish(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Clients that arrive during the drain get 503 + Retry-After, not "connection refused";
    the stream in flight at the signal still finishes."""
    srv = start_server(tiny_model_dir, tmp_path / "server.log", "--max-model-len", "1024")
    # long enough (about a thousand steps) to be still in flight when the late client arrives
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        with (
            httpx.Client(base_url=srv.base_url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            srv.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := http.get("/ready")).status_code == 200:  # the signal is handled
                assert time.monotonic() < deadline
                time.sleep(0.05)
            late = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            rest = [line for line in lines if line.startswith("data: ")]
        assert late.status_code == 503 and late.headers["retry-after"] == "1", late.text
        assert late.json()["error"]["code"] == "not_ready"
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert rest[-1] == "data: [DONE]"
        assert (
            json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        )
        assert srv.process.wait(30) in (0, -signal.SIGTERM)
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log()


# ---------------------------------------------------------------- keys (row 20)


@pytest.fixture(scope="module")
def keyed_app(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """Two user keys and an admin key, in-process."""
    from tests.evaluation.conftest import eval_settings, make_data_dir

    root = tmp_path_factory.mktemp("keyed")
    settings = eval_settings(
        tiny_model_dir,
        make_data_dir(root / "data", size=40),
        root / "cache",
        api_key="alice-key,bob-key",
        admin_api_key="root-key",
        eval_max_inflight=1,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def as_key(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_ready_is_public_and_everything_else_needs_a_key(keyed_app: TestClient) -> None:
    assert keyed_app.get("/ready").status_code == 200  # load balancers probe without a key
    assert keyed_app.get("/health").status_code == 200
    for method, path in [
        ("GET", "/v1/nothing"),
        ("DELETE", "/v1/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/evaluations"),
    ]:
        response = keyed_app.request(method, path)
        assert response.status_code == 401, (method, path, response.text)
    assert keyed_app.get("/v1/models", headers=as_key("bob-key")).status_code == 200


def test_ready_requires_a_key_when_configured(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        kv_cache_memory_mb=16,
        cache_dir=tmp_path,
        api_key="k",
        ready_requires_key=True,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 401
        assert client.get("/ready", headers=as_key("k")).status_code == 200
        assert client.get("/health").status_code == 200


EVAL_BODY = {"models": ["base"], "datasets": ["gsm8k"], "max_tokens": 64}


def test_only_the_creating_key_or_the_admin_cancels_a_job(keyed_app: TestClient) -> None:
    """Another key's DELETE is a 404, as a job that does not exist (it was a 403 that told
    the job was there); the job goes on."""
    jobs = [
        keyed_app.post("/v1/evaluations", json=EVAL_BODY, headers=as_key("alice-key")).json()
        for _ in range(2)
    ]
    first, second = (job["id"] for job in jobs)
    refused = keyed_app.delete(f"/v1/evaluations/{first}", headers=as_key("bob-key"))
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "evaluation_not_found"
    assert keyed_app.get(f"/v1/evaluations/{first}", headers=as_key("alice-key")).json()[
        "status"
    ] in ("queued", "running")
    own = keyed_app.delete(f"/v1/evaluations/{first}", headers=as_key("alice-key"))
    assert own.status_code == 200 and own.json()["status"] == "cancelled"
    admin = keyed_app.delete(f"/v1/evaluations/{second}", headers=as_key("root-key"))
    assert admin.status_code == 200 and admin.json()["status"] == "cancelled"


def test_a_key_sees_only_its_own_evaluation_jobs(keyed_app: TestClient) -> None:
    """Row 30: a user key lists, reads and streams the results of the jobs it created; another
    key's job answers exactly as an unknown one (404); the admin key sees every job. Any key
    read every job before."""
    created = {
        key: keyed_app.post("/v1/evaluations", json=EVAL_BODY, headers=as_key(key)).json()["id"]
        for key in ("alice-key", "bob-key")
    }
    alice, bob = created["alice-key"], created["bob-key"]
    unknown = "eval-" + "0" * 24

    def listed(key: str) -> set[str]:
        response = keyed_app.get("/v1/evaluations", headers=as_key(key))
        return {job["id"] for job in response.json()["data"]}

    try:
        assert alice in listed("alice-key") and bob not in listed("alice-key")
        assert bob in listed("bob-key") and alice not in listed("bob-key")
        assert {alice, bob} <= listed("root-key")
        for suffix in ("", "/results"):
            for key in ("alice-key", "root-key"):
                own = keyed_app.get(f"/v1/evaluations/{alice}{suffix}", headers=as_key(key))
                assert own.status_code == 200, (key, suffix, own.text)
            other = keyed_app.get(f"/v1/evaluations/{alice}{suffix}", headers=as_key("bob-key"))
            missing = keyed_app.get(f"/v1/evaluations/{unknown}{suffix}", headers=as_key("bob-key"))
            assert other.status_code == missing.status_code == 404, other.text
            assert other.json()["error"]["message"].replace(alice, "ID") == missing.json()["error"][
                "message"
            ].replace(unknown, "ID")
            assert other.json()["error"]["code"] == "evaluation_not_found"
    finally:
        for job in (alice, bob):
            keyed_app.delete(f"/v1/evaluations/{job}", headers=as_key("root-key"))


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/v1/adapters", {"json": {"name": "x"}}),  # not multipart: 415 came first
        ("DELETE", "/v1/adapters/nothing", {}),
        ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": "/x"}}),
        ("POST", "/v1/datasets", {"json": {"name": "x"}}),
    ],
    ids=["upload", "delete", "load", "dataset"],
)
def test_a_user_key_on_an_admin_route_is_403_before_anything_else(
    keyed_app: TestClient, method, path, kwargs
) -> None:
    """A valid key without the admin role: 403 permission_error (it was 401 "Invalid API key",
    or 415 for an upload sent as JSON). No key, or not a key of ours: 401. The admin key passes
    the guard (whatever the route then answers)."""
    user = keyed_app.request(method, path, headers=as_key("bob-key"), **kwargs)
    assert user.status_code == 403, user.text
    assert user.json()["error"]["type"] == "permission_error"
    assert "admin key" in user.json()["error"]["message"]
    for key in (None, "nobody"):
        assert keyed_app.request(method, path, headers=as_key(key), **kwargs).status_code == 401
    admin = keyed_app.request(method, path, headers=as_key("root-key"), **kwargs)
    assert admin.status_code != 401 and "admin key" not in admin.text, admin.text
