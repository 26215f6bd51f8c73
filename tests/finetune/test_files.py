"""The fine-tuning file store (server/finetune/files.py) and OpenAI's Files API over it
(server/api/routers/files.py): a round trip, a restart, deletion, paging and order, bad data
refused naming its line with nothing stored, hostile file names, per-key visibility, and the
`openai` SDK against the app unchanged."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from adapterserve.server.api.errors import FILE_ERRORS
from adapterserve.server.config import Settings
from adapterserve.server.finetune import files as files_module
from adapterserve.server.finetune.files import (
    FileError,
    FileLimitError,
    FileStore,
    FileTooLargeError,
    InvalidFileError,
    UnknownFileError,
    safe_filename,
)
from adapterserve.server.main import create_app

CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
INSTRUCTION = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
USER_A, USER_B, ADMIN = "user-a", "user-b", "admin-key"
MAX_FILE_BYTES = 4096


def jsonl(*records: dict) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode() + b"\n"


def stored_names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


# ---------------------------------------------------------------- the store


def test_round_trip_keeps_bytes_and_openais_fields(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    data = jsonl(CHAT, CHAT)
    stored = store.create(data, "train.jsonl", "fine-tune")
    assert re.fullmatch(r"file-[0-9a-f]{24}", stored.id)
    body = stored.to_dict()
    assert body == {
        "id": stored.id,
        "object": "file",
        "bytes": len(data),
        "created_at": body["created_at"],
        "filename": "train.jsonl",
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "records": 2,
        "format": "chat",
    }
    assert store.get(stored.id) == stored
    assert store.content(stored.id) == data
    assert stored_names(tmp_path) == {f"{stored.id}.data", f"{stored.id}.json"}
    on_disk = json.loads((tmp_path / f"{stored.id}.json").read_text())
    assert {k: on_disk[k] for k in body} == body


@pytest.mark.parametrize(
    ("records", "kind"),
    [
        ((COMPLETION,), "completion"),
        ((INSTRUCTION, INSTRUCTION), "instruction"),
        ((CHAT, COMPLETION), "mixed"),
    ],
)
def test_format_names_the_records_kind(tmp_path: Path, records: tuple, kind: str) -> None:
    stored = FileStore(tmp_path).create(io.BytesIO(jsonl(*records)), "t.jsonl", "fine-tune")
    assert (stored.format, stored.records) == (kind, len(records))


def test_a_restart_reads_the_folder_back(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    created = [store.create(jsonl(COMPLETION), f"{i}.jsonl", "fine-tune") for i in range(3)]
    (tmp_path / ".tmp-file-0123.data").write_bytes(b"cut off")  # a crash mid-upload
    orphan = "file-" + "a" * 24
    (tmp_path / f"{orphan}.data").write_bytes(b"no metadata")
    (tmp_path / f"file-{'b' * 24}.json").write_text("{not json")
    again = FileStore(tmp_path)
    assert again.list().data == list(reversed(created))
    assert again.content(created[1].id) == jsonl(COMPLETION)
    assert ".tmp-file-0123.data" not in stored_names(tmp_path)
    assert f"{orphan}.data" not in stored_names(tmp_path)
    with pytest.raises(UnknownFileError):
        again.get(orphan)


def test_delete_removes_the_file_for_good(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    kept = store.create(jsonl(COMPLETION), "kept.jsonl", "fine-tune")
    gone = store.create(jsonl(COMPLETION), "gone.jsonl", "fine-tune")
    assert store.delete(gone.id) == gone
    for call in (store.get, store.content, store.delete):
        with pytest.raises(UnknownFileError, match="No such File object"):
            call(gone.id)
    assert stored_names(tmp_path) == {f"{kept.id}.data", f"{kept.id}.json"}
    assert [f.id for f in FileStore(tmp_path).list().data] == [kept.id]


def test_list_pages_newest_first_and_in_either_order(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    ids = [store.create(jsonl(COMPLETION), f"{i}.jsonl", "fine-tune").id for i in range(5)]
    first = store.list(limit=2)
    assert [f.id for f in first.data] == [ids[4], ids[3]] and first.has_more
    second = store.list(limit=2, after=ids[3])
    assert [f.id for f in second.data] == [ids[2], ids[1]] and second.has_more
    last = store.list(limit=2, after=ids[1])
    assert [f.id for f in last.data] == [ids[0]] and not last.has_more
    assert [f.id for f in store.list(order="asc").data] == ids
    assert [f.id for f in store.list(order="asc", limit=3, after=ids[0]).data] == ids[1:4]
    assert store.list(purpose="batch").data == []
    with pytest.raises(InvalidFileError) as refused:
        store.list(after="file-" + "0" * 24)
    assert refused.value.param == "after"
    for limit in (0, 10_001):
        with pytest.raises(InvalidFileError):
            store.list(limit=limit)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (jsonl(COMPLETION, COMPLETION, {"prompt": "x"}), "line 3: `completion` is missing"),
        (jsonl(CHAT) + b"{not json}\n", "line 2: not a JSON object"),
        (jsonl(COMPLETION, {"instruction": "x", "output": 5}), "line 2: `output` must be a string"),
        (b"\xff\xfe", "not UTF-8"),
        (b"", "empty"),
        (b"\n  \n", "no records"),
    ],
)
def test_bad_data_is_refused_naming_the_line_and_nothing_is_stored(
    tmp_path: Path, data: bytes, where: str
) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(InvalidFileError, match=re.escape(where)) as refused:
        store.create(io.BytesIO(data), "bad.jsonl", "fine-tune")
    assert refused.value.param == "file"
    assert stored_names(tmp_path) == set() and store.list().data == []


@pytest.mark.parametrize("purpose", ["assistants", "batch", "vision", "user_data", "evals", "x"])
def test_only_fine_tune_is_accepted(tmp_path: Path, purpose: str) -> None:
    with pytest.raises(InvalidFileError, match="only 'fine-tune'") as refused:
        FileStore(tmp_path).create(jsonl(COMPLETION), "t.jsonl", purpose)
    assert refused.value.param == "purpose"
    assert stored_names(tmp_path) == set()


def test_caps_refuse_before_storing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_file_bytes=1024, max_files=1)
    big = jsonl(*[COMPLETION] * 100)
    assert len(big) > 1024
    with pytest.raises(FileTooLargeError):
        store.create(io.BytesIO(big), "big.jsonl", "fine-tune")
    store.create(jsonl(COMPLETION), "one.jsonl", "fine-tune")
    with pytest.raises(FileLimitError):
        store.create(jsonl(COMPLETION), "two.jsonl", "fine-tune")
    assert len(stored_names(tmp_path)) == 2  # the first file's .data and .json only


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("../../../../etc/passwd", "passwd"),
        ("/abs/path/train.jsonl", "train.jsonl"),
        ("..\\..\\win.jsonl", "win.jsonl"),
        ("a\x00b\nc\u202ed.jsonl", "abcd.jsonl"),
        ("..", ".."),
        ("", "upload"),
        (None, "upload"),
        ("x" * 1000, "x" * 255),
    ],
)
def test_hostile_filenames_are_only_metadata(tmp_path: Path, name: str | None, shown: str) -> None:
    assert safe_filename(name) == shown
    root = tmp_path / "files"
    stored = FileStore(root).create(jsonl(COMPLETION), name, "fine-tune")
    assert stored.filename == shown
    assert stored_names(tmp_path) == {"files"}  # nothing written beside the store
    assert stored_names(root) == {f"{stored.id}.data", f"{stored.id}.json"}


def test_a_caller_sees_only_its_own_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    mine = store.create(jsonl(COMPLETION), "a.jsonl", "fine-tune", owner="key-a")
    keyless = store.create(jsonl(COMPLETION), "b.jsonl", "fine-tune")  # made while keys were off
    assert store.get(mine.id, caller="key-a", admin=False) == mine
    assert store.list(caller="key-a", admin=False).data == [mine]
    assert store.list(caller="key-b", admin=False).data == []
    for file_id in (mine.id, keyless.id):
        with pytest.raises(UnknownFileError):
            store.get(file_id, caller="key-b", admin=False)
        with pytest.raises(UnknownFileError):
            store.delete(file_id, caller="key-b", admin=False)
    assert store.list().data == [keyless, mine]  # the admin sees all


def test_every_file_error_has_an_answer() -> None:
    typed = {
        value
        for value in vars(files_module).values()
        if isinstance(value, type) and issubclass(value, FileError) and value is not FileError
    }
    assert typed and set(FILE_ERRORS) == typed


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture(scope="module")
def app_client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        kv_cache_memory_mb=16,
        engine_process=False,
        warm_grammars=False,
        cache_dir=tmp_path_factory.mktemp("files-cache"),
        api_key=f"{USER_A},{USER_B}",
        admin_api_key=ADMIN,
        max_file_bytes=MAX_FILE_BYTES,
    )
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {USER_A}"}) as client:
        yield client


def upload(client: TestClient, data: bytes, purpose: str = "fine-tune", **kwargs):
    files = {"file": ("train.jsonl", data, "application/jsonl")}
    return client.post("/v1/files", files=files, data={"purpose": purpose}, **kwargs)


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response, status: int, param: str | None, message: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    return error


def test_http_round_trip(app_client: TestClient) -> None:
    data = jsonl(CHAT, INSTRUCTION)
    created = upload(app_client, data)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "file" and body["bytes"] == len(data)
    assert (body["records"], body["format"], body["status"]) == (2, "mixed", "processed")
    file_id = body["id"]
    assert app_client.get(f"/v1/files/{file_id}").json() == body
    content = app_client.get(f"/v1/files/{file_id}/content")
    assert content.content == data
    assert content.headers["content-type"] == "application/octet-stream"
    listed = app_client.get("/v1/files", params={"limit": 1}).json()
    assert listed["object"] == "list" and listed["data"] == [body]
    assert listed["first_id"] == listed["last_id"] == file_id
    deleted = app_client.delete(f"/v1/files/{file_id}")
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        error = assert_error(app_client.get(path), 404, "file_id", "No such File object")
        assert (error["type"], error["code"]) == ("invalid_request_error", "file_not_found")
    assert_error(app_client.delete(f"/v1/files/{file_id}"), 404, "file_id", "No such File")
    assert_error(app_client.get("/v1/files/../../etc/passwd"), 404, None, "No route")


def test_http_refusals_store_nothing(app_client: TestClient) -> None:
    before = app_client.get("/v1/files", headers=as_key(ADMIN)).json()["data"]
    bad = upload(app_client, jsonl(COMPLETION, {"prompt": "x", "completion": 3}))
    error = assert_error(bad, 400, "file", "line 2: `completion` must be a string")
    assert error["type"] == "invalid_request_error"
    assert_error(upload(app_client, b""), 400, "file", "empty")
    assert_error(upload(app_client, jsonl(COMPLETION), "assistants"), 400, "purpose", "fine-tune")
    too_big = jsonl(*[COMPLETION] * 200)
    assert len(too_big) > MAX_FILE_BYTES
    assert_error(upload(app_client, too_big), 413, "file", f"exceeds {MAX_FILE_BYTES} bytes")
    past_guard = b"x" * (MAX_FILE_BYTES + 70_000)  # past the cap + framing: cut off unread
    assert_error(upload(app_client, past_guard), 413, None, "--max-file-bytes")
    as_json = app_client.post("/v1/files", json={"file": "x", "purpose": "fine-tune"})
    assert_error(as_json, 415, None, "multipart/form-data")
    no_purpose = app_client.post("/v1/files", files={"file": ("t.jsonl", jsonl(COMPLETION))})
    assert_error(no_purpose, 400, "purpose", "'purpose'")
    extra = {"purpose": "fine-tune", "name": "x"}
    files = {"file": ("t.jsonl", jsonl(COMPLETION))}
    assert_error(app_client.post("/v1/files", files=files, data=extra), 400, "name", "name")
    assert_error(app_client.get("/v1/files", params={"order": "up"}), 400, "order", "order")
    assert_error(app_client.get("/v1/files", params={"limit": 0}), 400, "limit", "limit")
    after = app_client.get("/v1/files", params={"after": "file-" + "0" * 24})
    assert_error(after, 400, "after", "previous page")
    assert app_client.get("/v1/files", headers=as_key(ADMIN)).json()["data"] == before


def test_http_another_key_sees_nothing_and_the_admin_all(app_client: TestClient) -> None:
    file_id = upload(app_client, jsonl(COMPLETION)).json()["id"]
    other = as_key(USER_B)
    assert file_id not in [
        f["id"] for f in app_client.get("/v1/files", headers=other).json()["data"]
    ]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert_error(app_client.get(path, headers=other), 404, "file_id", "No such File object")
    assert_error(
        app_client.delete(f"/v1/files/{file_id}", headers=other), 404, "file_id", "No such"
    )
    assert app_client.get(f"/v1/files/{file_id}", headers=as_key(ADMIN)).status_code == 200
    assert app_client.get("/v1/files", headers={"Authorization": ""}).status_code == 401
    assert app_client.delete(f"/v1/files/{file_id}").json()["deleted"] is True


def test_the_openai_sdk_works_unchanged(app_client: TestClient) -> None:
    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key=USER_A, http_client=app_client, max_retries=0
    )
    data = jsonl(CHAT, CHAT, CHAT)
    created = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert created.id.startswith("file-") and created.filename == "train.jsonl"
    assert (created.bytes, created.purpose, created.status) == (len(data), "fine-tune", "processed")
    second = client.files.create(file=("more.jsonl", jsonl(COMPLETION)), purpose="fine-tune")
    page = client.files.list(purpose="fine-tune", limit=1)
    assert [f.id for f in page.data] == [second.id] and page.has_more
    every = [f.id for f in client.files.list(limit=1)]  # the SDK follows the cursor
    assert every[:2] == [second.id, created.id]
    assert client.files.retrieve(created.id).model_dump()["records"] == 3
    assert client.files.content(created.id).read() == data
    assert client.files.delete(created.id).deleted is True
    assert client.files.delete(second.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", b'{"prompt": 1}\n'), purpose="fine-tune")
    assert refused.value.body["param"] == "file" and "line 1" in refused.value.body["message"]
