"""Adapter management over HTTP: uploads (files, zip, tar.gz), listing, completions with an
adapter, replace, delete, vLLM load/unload under a root, restart, admin key, and the negative
table (SECURITY.md rows 1-8) against one running server."""

from __future__ import annotations

import io
import json
import logging
import math
import signal
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from adapterserve.adapters.spec import BaseFingerprint
from adapterserve.server import cli
from adapterserve.server.config import Settings
from tests.adapters.conftest import (
    TINY,
    bottleneck_config,
    bottleneck_tensors,
    save_peft_adapter,
    write_adapter,
)
from tests.adapters.test_formats import A0, entry, lora_dir, poisoned, raw_weights, with_tensor
from tests.server.conftest import Server, start_server, stop_server

pytest.importorskip("peft")

ADMIN_KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BASE = "tiny"
UPLOAD_CAP = 256 * 1024
MAX_RANK = 8
PROMPT = "Once upon a time"
FINGERPRINT = BaseFingerprint.from_hf_config(TINY)


@dataclass
class Env:
    """The server and every folder it may touch; `root` holds all of them but the logs."""

    root: Path
    store: Path
    spool: Path  # the server's TMPDIR: multipart spooling must leave nothing here
    roots: Path  # --adapter-root: load_lora_adapter may read here
    outside: Path  # an adapter folder outside every root
    work: Path  # where tests build adapters before sending them
    logs: Path
    server: Server
    http: httpx.Client
    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def peft_lora(path: Path, seed: int, r: int = 4) -> Path:
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
    return save_peft_adapter(path, config, seed=seed)[0]


def bottleneck(path: Path, seed: int = 3) -> Path:
    targets = {"mlp.up_proj": (64, 64), "mlp.down_proj": (64, 64)}
    tensors = bottleneck_tensors(FINGERPRINT, 8, targets, seed=seed)
    return write_adapter(path, bottleneck_config(non_linearity="relu", scaling=0.5), tensors)


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("adapters-http")
    logs = tmp_path_factory.mktemp("adapters-http-logs")
    folders = {name: root / name for name in ("store", "spool", "roots", "outside", "work")}
    for folder in folders.values():
        folder.mkdir()
    peft_lora(folders["roots"] / "rootlora", seed=11)
    peft_lora(folders["outside"] / "outsidelora", seed=12)
    flags = (
        "--served-model-name",
        BASE,
        "--max-model-len",
        "256",
        "--admin-api-key",
        ADMIN_KEY,
        "--max-upload-bytes",
        str(UPLOAD_CAP),
        "--max-adapter-rank",
        str(MAX_RANK),
        "--adapter-slots",
        "2",
        "--adapter-root",
        str(folders["roots"]),
        "--adapter-store-dir",
        str(folders["store"]),
    )
    variables = {"ADAPTERSERVE_CACHE_DIR": str(root / "cache"), "TMPDIR": str(folders["spool"])}
    server = start_server(tiny_model_dir, logs / "server.log", *flags, env=variables)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield Env(root, logs=logs, server=server, http=http, flags=flags, env=variables, **folders)
    status = stop_server(server)
    assert "Traceback" not in server.log(), server.log()[-4000:]
    assert status in (0, -signal.SIGTERM), f"exit status {status}"


# ---------------------------------------------------------------- request helpers


def folder_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]


def upload(
    env: Env,
    name: str,
    files: list[tuple[str, tuple[str, bytes]]],
    replace: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    params = {"replace": "true"} if replace else {}
    return env.http.post(
        "/v1/adapters",
        data={"name": name},
        files=files,
        params=params,
        headers=ADMIN if headers is None else headers,
    )


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_folder(folder: Path) -> bytes:
    return tar_of([(tarfile.TarInfo(p.name), p.read_bytes()) for p in sorted(folder.iterdir())])


def complete(env: Env, model: str, max_tokens: int = 8) -> httpx.Response:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
    }
    return env.http.post("/v1/completions", json=body)


def greedy(env: Env, model: str) -> tuple[str, list[float]]:
    response = complete(env, model)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def assert_differs(first: tuple[str, list[float]], second: tuple[str, list[float]]) -> None:
    assert first[0] != second[0] or not all(
        math.isclose(a, b, abs_tol=1e-4) for a, b in zip(first[1], second[1], strict=True)
    )


def assert_error(response: httpx.Response, env: Env, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    for leak in (str(env.root), "Traceback", "pytest-of-"):
        assert leak not in response.text, response.text
    return error


def tree(folder: Path) -> set[tuple[str, int]]:
    """Every path under `folder` with its size (0 for folders)."""
    return {
        (str(p.relative_to(folder)), 0 if p.is_dir() else p.lstat().st_size)
        for p in folder.rglob("*")
    }


def model_ids(env: Env) -> set[str]:
    return {card["id"] for card in env.http.get("/v1/models").json()["data"]}


# ---------------------------------------------------------------- positive paths


def test_upload_files_lists_and_serves_the_adapter(env: Env) -> None:
    response = upload(env, "lora-a", folder_files(peft_lora(env.work / "lora-a", seed=1)))
    assert response.status_code == 201, response.text
    card = response.json()
    assert card["id"] == card["name"] == "lora-a" and card["parent"] == BASE
    assert card["kind"] == "lora" and card["rank"] == 4 and card["targets"] == ["q", "v"]
    assert card["origin"] == "upload" and card["tier"] in ("device", "host", "disk")
    assert card["size_bytes"] > 0 and card["num_virtual_tokens"] == 0
    assert str(env.store) not in response.text and "path" not in card
    assert card.pop("ignored_files") == []  # peft's folder: config, safetensors, README.md

    assert env.http.get("/v1/adapters/lora-a").json() == card
    assert "lora-a" in {a["name"] for a in env.http.get("/v1/adapters").json()["data"]}
    models = {c["id"]: c for c in env.http.get("/v1/models").json()["data"]}
    assert models["lora-a"]["parent"] == BASE and models["lora-a"]["root"] == "lora-a"
    assert models[BASE]["hidden_size"] == 64 and models[BASE]["num_hidden_layers"] == 2
    assert models[BASE]["num_attention_heads"] == 4 and models[BASE]["num_key_value_heads"] == 2
    assert models[BASE]["intermediate_size"] == 128 and models[BASE]["vocab_size"] > 0
    assert env.http.get("/v1/models/lora-a").json()["parent"] == BASE

    adapted, base = greedy(env, "lora-a"), greedy(env, BASE)
    assert_differs(adapted, base)
    assert greedy(env, "lora-a") == adapted  # greedy is deterministic
    assert (env.store / "lora-a" / "adapter_model.safetensors").is_file()


def test_upload_zip_in_a_folder_and_tar_gz_bottleneck(env: Env) -> None:
    folder = peft_lora(env.work / "lora-zip", seed=2)
    members = {f"lora-zip/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}
    archive = [("archive", ("lora.zip", zip_of(members)))]
    response = upload(env, "lora-zip", archive)
    assert response.status_code == 201, response.text

    tarball = [("archive", ("bottleneck.tar.gz", tar_folder(bottleneck(env.work / "bn"))))]
    response = upload(env, "series-bn", tarball)
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == "series" and response.json()["rank"] == 8
    assert {"lora-zip", "series-bn"} <= model_ids(env)
    base = greedy(env, BASE)
    assert_differs(greedy(env, "lora-zip"), base)
    assert_differs(greedy(env, "series-bn"), base)


def test_upload_drops_files_outside_the_allow_list(env: Env) -> None:
    folder = peft_lora(env.work / "hub", seed=13)  # adapter_config.json, safetensors, README.md
    response = upload(env, "hub", [*folder_files(folder), *HUB_EXTRAS])
    assert response.status_code == 201, response.text
    assert response.json()["ignored_files"] == [name for _, (name, _) in HUB_EXTRAS]
    stored = {p.name: p.read_bytes() for p in (env.store / "hub").iterdir()}
    assert stored == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "ignored_files" not in env.http.get("/v1/adapters/hub").json()
    assert_differs(greedy(env, "hub"), greedy(env, BASE))


def test_upload_archive_drops_a_checkpoint_folder(env: Env) -> None:
    folder = peft_lora(env.work / "hub-zip", seed=14)
    members = {f"hub/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}
    extras = {
        "hub/tokenizer.json": b"{}",
        "hub/checkpoint-100/adapter_model.safetensors": b"not read",
        "hub/checkpoint-100/optimizer.pt": b"\x80\x04K\x01.",
    }
    response = upload(env, "hub-zip", [("archive", ("hub.zip", zip_of({**members, **extras})))])
    assert response.status_code == 201, response.text
    assert response.json()["ignored_files"] == list(extras)
    assert sorted(p.name for p in (env.store / "hub-zip").iterdir()) == sorted(
        p.name for p in folder.iterdir()
    )
    assert_differs(greedy(env, "hub-zip"), greedy(env, BASE))


def test_vllm_load_of_a_hub_folder_ignores_the_extras(env: Env) -> None:
    folder = peft_lora(env.roots / "hubroot", seed=15)
    for _, (name, data) in HUB_EXTRAS:
        (folder / name).write_bytes(data)
    (folder / "checkpoint-100").mkdir()
    (folder / "checkpoint-100" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    body = {"lora_name": "vllm-hub", "lora_path": str(folder)}
    response = env.http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert_differs(greedy(env, "vllm-hub"), greedy(env, BASE))
    unload = {"lora_name": "vllm-hub"}
    assert env.http.post("/v1/unload_lora_adapter", json=unload, headers=ADMIN).status_code == 200


def test_replace_serves_the_new_weights(env: Env) -> None:
    first = upload(env, "swap", folder_files(peft_lora(env.work / "swap1", seed=4)))
    assert first.status_code == 201, first.text
    before = greedy(env, "swap")
    second = upload(env, "swap", folder_files(peft_lora(env.work / "swap2", seed=5)), replace=True)
    assert second.status_code == 201, second.text
    assert second.json()["version"] > first.json()["version"]
    after = greedy(env, "swap")
    assert_differs(before, after)
    assert greedy(env, "swap") == after


def test_delete_then_404(env: Env) -> None:
    assert upload(env, "gone", folder_files(peft_lora(env.work / "gone", 6))).status_code == 201
    response = env.http.delete("/v1/adapters/gone", headers=ADMIN)
    assert response.status_code == 200 and response.json()["name"] == "gone"
    assert not (env.store / "gone").exists()
    assert_error(env.http.get("/v1/adapters/gone"), env, 404)
    assert_error(env.http.get("/v1/models/gone"), env, 404)
    assert "gone" not in model_ids(env)
    error = assert_error(complete(env, "gone"), env, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_deleted_adapters_leave_no_metric_series(env: Env) -> None:
    """Upload/delete cycles must not grow /metrics: a deleted adapter's series go with it."""
    sizes = []
    for cycle in range(4):
        files = folder_files(peft_lora(env.work / f"cycle{cycle}", seed=20 + cycle))
        assert upload(env, f"cycle{cycle}", files).status_code == 201
        assert complete(env, f"cycle{cycle}", max_tokens=2).status_code == 200
        assert f'model="cycle{cycle}"' in env.http.get("/metrics").text
        assert env.http.delete(f"/v1/adapters/cycle{cycle}", headers=ADMIN).status_code == 200
        text = env.http.get("/metrics").text
        assert f'model="cycle{cycle}"' not in text
        sizes.append(len(text))
    assert max(sizes) - min(sizes) < 512, sizes  # the same series every cycle


def test_vllm_load_and_unload_under_a_root(env: Env) -> None:
    body = {"lora_name": "vllm-a", "lora_path": str(env.roots / "rootlora")}
    response = env.http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'vllm-a' added successfully."
    card = env.http.get("/v1/adapters/vllm-a").json()
    assert card["origin"] == "path" and str(env.roots) not in json.dumps(card)
    assert_differs(greedy(env, "vllm-a"), greedy(env, BASE))
    again = env.http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)
    assert assert_error(again, env, 409)["param"] == "lora_name"

    unload = {"lora_name": "vllm-a"}
    response = env.http.post("/v1/unload_lora_adapter", json=unload, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'vllm-a' removed successfully."
    assert (env.roots / "rootlora" / "adapter_config.json").is_file()  # a path is never deleted
    assert_error(complete(env, "vllm-a"), env, 404)
    again = env.http.post("/v1/unload_lora_adapter", json=unload, headers=ADMIN)
    assert assert_error(again, env, 404)["param"] == "lora_name"


@pytest.mark.parametrize(
    "method,path,kwargs",
    [
        ("POST", "/v1/adapters", {"data": {"name": "x"}, "files": [("files", ("a", b"1"))]}),
        ("DELETE", "/v1/adapters/lora-a", {}),
        ("POST", "/v1/load_lora_adapter", {"json": {"lora_name": "x", "lora_path": "/"}}),
        ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "lora-a"}}),
    ],
    ids=["upload", "delete", "load", "unload"],
)
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_admin_routes_need_the_admin_key(env: Env, method, path, kwargs, key) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = env.http.request(method, path, headers=headers, **kwargs)
    assert assert_error(response, env, 401)["type"] == "authentication_error"
    assert env.http.get("/v1/adapters").status_code == 200  # reading needs no admin key


def wait_until_running(env: Env, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in env.http.get("/metrics").text.splitlines():
            if line.startswith("adapterserve_requests_running ") and float(line.split()[1]) > 0:
                return
        time.sleep(0.01)
    raise AssertionError("the request never started running")


def test_replace_in_flight_keeps_the_old_weights(env: Env) -> None:
    """SECURITY row 8: a request in flight finishes on the weights it started with."""
    assert upload(env, "live", folder_files(peft_lora(env.work / "live1", 7))).status_code == 201
    new = folder_files(peft_lora(env.work / "live2", seed=8))
    body = {
        "model": "live",
        "prompt": PROMPT,
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
    }
    expected = env.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    old_weights = greedy(env, "live")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(env.http.post, "/v1/completions", json=body)
        wait_until_running(env)
        assert upload(env, "live", new, replace=True).status_code == 201
        assert not in_flight.done(), "the request finished before the replace: raise max_tokens"
        assert in_flight.result().json()["choices"][0]["text"] == expected
    assert_differs(greedy(env, "live"), old_weights)  # new requests see the new weights


def test_restart_keeps_uploads(env: Env, tiny_model_dir: Path) -> None:
    assert upload(env, "durable", folder_files(peft_lora(env.work / "durable", 9))).status_code
    expected = greedy(env, "durable")
    names = {a["name"] for a in env.http.get("/v1/adapters").json()["data"]}
    uploaded = {n for n in names if (env.store / n).is_dir()}
    second = start_server(tiny_model_dir, env.logs / "restart.log", *env.flags, env=env.env)
    try:
        with httpx.Client(base_url=second.base_url, timeout=60) as http:
            listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
            assert uploaded <= set(listed) and listed["durable"]["origin"] == "upload"
            body = {
                "model": "durable",
                "prompt": PROMPT,
                "max_tokens": 8,
                "temperature": 0,
                "logprobs": 1,
            }
            choice = http.post("/v1/completions", json=body).json()["choices"][0]
            assert choice["text"] == expected[0]
    finally:
        stop_server(second)
    assert "Traceback" not in second.log(), second.log()[-4000:]


# ---------------------------------------------------------------- the negative table


def adapter_files(build: Callable[[Path], Path]) -> Callable[[Env], list]:
    """Files of an adapter folder built by `build` (a tests.adapters builder)."""

    def files(env: Env) -> list:
        folder = env.work / f"bad-{len(list(env.work.iterdir()))}"
        return folder_files(build(folder))

    return files


def good_files(env: Env) -> list:
    return adapter_files(lambda p: lora_dir(p, FINGERPRINT))(env)


def good_members(env: Env) -> dict[str, bytes]:
    return {name: data for _, (name, data) in good_files(env)}


def config_only(env: Env) -> list:
    return [f for f in good_files(env) if f[1][0] == "adapter_config.json"]


# What a hub download holds beside the adapter.
HUB_EXTRAS = [
    ("files", ("tokenizer.json", b"{}")),
    ("files", ("special_tokens_map.json", b"{}")),
    ("files", ("training_args.bin", b"\x80\x04K\x01.")),
    ("files", ("adapter_model.bin", b"\x80\x04K\x01.")),
]


def send_upload(name: str, files: Callable[[Env], list]) -> Callable[[Env], httpx.Response]:
    return lambda env: upload(env, name, files(env))


def send_archive(filename: str, archive: Callable[[Env], bytes]) -> Callable[[Env], httpx.Response]:
    return lambda env: upload(env, "bad-archive", [("archive", (filename, archive(env)))])


def zip_with(extra: dict[str, bytes]) -> Callable[[Env], bytes]:
    return lambda env: zip_of({**good_members(env), **extra})


def tar_with(info: tarfile.TarInfo, data: bytes | None) -> Callable[[Env], bytes]:
    def build(env: Env) -> bytes:
        members = [(tarfile.TarInfo(name), blob) for name, blob in good_members(env).items()]
        return tar_of([*members, (info, data)])

    return build


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def oversize_files(extra: int) -> Callable[[Env], list]:
    return lambda env: [("files", ("adapter_model.safetensors", b"\0" * (UPLOAD_CAP + extra)))]


def send_chunked(env: Env) -> httpx.Response:
    """An oversize upload without Content-Length: the cap must hold while streaming."""
    request = env.http.build_request(
        "POST", "/v1/adapters", data={"name": "big"}, files=oversize_files(200_000)(env)
    )
    body = request.read()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    headers = {**ADMIN, "content-type": request.headers["content-type"]}
    return env.http.post("/v1/adapters", content=chunks, headers=headers)


def completion_for(model: str) -> Callable[[Env], httpx.Response]:
    return lambda env: complete(env, model)


def load_path(path: Callable[[Env], str]) -> Callable[[Env], httpx.Response]:
    def send(env: Env) -> httpx.Response:
        body = {"lora_name": "loaded", "lora_path": path(env)}
        return env.http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)

    return send


def nan_lora(path: Path) -> Path:
    return lora_dir(path, FINGERPRINT, tensors=poisoned(math.nan))


@dataclass(frozen=True)
class Row:
    id: str
    security_row: int
    send: Callable[[Env], httpx.Response]
    status: int
    param: str | None = None


NEGATIVE = [
    Row("name-dotdot", 1, send_upload("../evil", good_files), 400, "name"),
    Row("name-absolute", 1, send_upload("/tmp/evil", good_files), 400, "name"),
    Row("name-nul", 1, send_upload("evil\x00name", good_files), 400, "name"),
    Row("zip-slip", 1, send_archive("a.zip", zip_with({"../evil": b"x"})), 400, "archive"),
    Row(
        "zip-absolute-member",
        1,
        send_archive("a.zip", zip_with({"/tmp/adapter_config.json": b"{}"})),
        400,
        "archive",
    ),
    Row(
        "tar-absolute-member",
        1,
        send_archive("a.tar.gz", tar_with(tarfile.TarInfo("/tmp/README.md"), b"x")),
        400,
        "archive",
    ),
    Row(
        "tar-symlink-member",
        1,
        send_archive("a.tar.gz", tar_with(symlink("README.md", "/etc/passwd"), None)),
        400,
        "archive",
    ),
    Row(
        "tar-dotdot-member",
        1,
        send_archive("a.tgz", tar_with(tarfile.TarInfo("../README.md"), b"x")),
        400,
        "archive",
    ),
    Row(
        "pickle-only-files",
        2,
        send_upload(
            "pickled",
            lambda env: [*config_only(env), ("files", ("adapter_model.bin", b"\x80\x04K\x01."))],
        ),
        400,
        "files",
    ),
    Row(
        "pickle-only-zip",
        2,
        send_archive(
            "a.zip",
            lambda env: zip_of(
                {
                    "adapter_config.json": good_members(env)["adapter_config.json"],
                    "weights.pt": b"\x80\x04K\x01.",
                }
            ),
        ),
        400,
        "archive",
    ),
    Row(
        "extras-then-traversal-files",
        1,
        send_upload(
            "unsafe",
            lambda env: [*good_files(env), *HUB_EXTRAS, ("files", ("../README.md", b"x"))],
        ),
        400,
        "files",
    ),
    Row(
        "extras-then-slip-zip",
        1,
        send_archive("a.zip", zip_with({"tokenizer.json": b"{}", "a/../../evil": b"x"})),
        400,
        "archive",
    ),
    Row(
        "header-offsets-past-end",
        3,
        send_upload(
            "lying",
            adapter_files(lambda p: raw_weights(p, entry(offsets=(0, 10**9)), b"\0" * 1024)),
        ),
        400,
        "adapter_model.safetensors",
    ),
    Row(
        "header-absurd-length",
        3,
        send_upload(
            "lying",
            adapter_files(lambda p: raw_weights(p, entry(), b"\0" * 1024, header_len=2**62)),
        ),
        400,
        "adapter_model.safetensors",
    ),
    Row(
        "wrong-shapes",
        4,
        send_upload(
            "shapes",
            adapter_files(
                lambda p: lora_dir(p, FINGERPRINT, tensors=with_tensor(A0, torch.randn(4, 63)))
            ),
        ),
        400,
        A0,
    ),
    Row(
        "nan-weights",
        4,
        send_upload("nan", adapter_files(nan_lora)),
        400,
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
    ),
    Row(
        "rank-above-max",
        4,
        send_upload("big-rank", adapter_files(lambda p: lora_dir(p, FINGERPRINT, r=16))),
        400,
        "r",
    ),
    Row(
        "unknown-peft-type",
        4,
        send_upload("loha", adapter_files(lambda p: lora_dir(p, FINGERPRINT, peft_type="LOHA"))),
        400,
        "peft_type",
    ),
    Row(
        "config-not-json",
        4,
        send_upload(
            "notjson",
            lambda env: [
                ("files", ("adapter_config.json", b"{'r': 4")),
                *[f for f in good_files(env) if f[1][0] != "adapter_config.json"],
            ],
        ),
        400,
        "adapter_config.json",
    ),
    Row("oversize-declared", 6, send_upload("big", oversize_files(200_000)), 413),
    Row("oversize-chunked", 6, send_chunked, 413),
    Row("oversize-files-in-slack", 6, send_upload("big", oversize_files(10)), 413, "files"),
    Row("duplicate-name", 7, send_upload("dup", good_files), 409, "name"),
    Row("base-model-name", 7, send_upload(BASE, good_files), 409, "name"),
    Row(
        "delete-unknown",
        7,
        lambda env: env.http.delete("/v1/adapters/no-such", headers=ADMIN),
        404,
    ),
    Row("completion-unknown-model", 7, completion_for("no-such-adapter"), 404, "model"),
    Row("load-outside-root", 1, load_path(lambda env: str(env.outside / "outsidelora")), 403),
    Row(
        "load-dotdot-escape",
        1,
        load_path(lambda env: f"{env.roots}/../outside/outsidelora"),
        403,
        "lora_path",
    ),
    Row("load-missing", 1, load_path(lambda env: str(env.roots / "missing")), 404, "lora_path"),
]


@pytest.fixture(scope="module")
def dup(env: Env) -> None:
    response = upload(env, "dup", good_files(env))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("row", NEGATIVE, ids=[f"row{r.security_row}-{r.id}" for r in NEGATIVE])
def test_negative_table(env: Env, dup: None, row: Row) -> None:
    before = tree(env.root)
    response = row.send(env)
    error = assert_error(response, env, row.status)
    if row.param is not None:
        assert error["param"] == row.param, error
    assert len(error["message"]) < 400
    # Nothing written anywhere (store included) but the adapters we built to send; no
    # spooled temporary files left; the staging area is empty again.
    added = {path for path, _ in tree(env.root) - before}
    assert all(path.startswith("work/") for path in added), added
    assert {path for path, _ in before - tree(env.root)} == set()
    assert not list(env.spool.iterdir())
    assert not list((env.store / ".staging").iterdir())
    # The server keeps serving, base and adapters alike.
    assert complete(env, BASE, max_tokens=2).status_code == 200
    assert complete(env, "dup", max_tokens=2).status_code == 200


# ---------------------------------------------------------------- serve flags


def test_adapter_flags_are_repeatable(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--adapter",
            "a=/x",
            "--adapter",
            "b=/y",
            "--adapter-dir",
            str(tmp_path),
            "--adapter-root",
            str(tmp_path),
            "--adapter-slots",
            "3",
            "--max-adapter-rank",
            "16",
            "--max-upload-bytes",
            "4096",
        ]
    )
    settings = cli.settings_from_args(args)
    assert settings.adapters == ["a=/x", "b=/y"] and settings.adapter_dirs == [tmp_path]
    assert settings.adapter_roots == [tmp_path] and settings.adapter_slots == 3
    assert settings.max_adapter_rank == 16 and settings.max_upload_bytes == 4096


@pytest.mark.parametrize(
    "adapters,reason",
    [
        (["no-equals-sign"], "expects NAME=PATH"),
        (["../evil={folder}"], "invalid adapter name"),
        (["ok={folder}/missing"], "is not an adapter directory"),
    ],
)
def test_bad_adapter_flag_exits_2_with_the_reason(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, adapters, reason
) -> None:
    items = [item.format(folder=tmp_path) for item in adapters]
    with caplog.at_level(logging.ERROR):
        assert cli.serve(Settings(model=str(tiny_model_dir), port=0, adapters=items)) == 2
    assert reason in caplog.text
