"""AdapterStore: durable layout, atomic commit/replace, the upload negative table, and files
outside the allow-list (dropped unwritten, reported).

SECURITY.md rows 1, 2, 6, 7: every refused upload gives the stated status and param, leaves
nothing outside the store (the whole tmp tree is snapshotted, a sentinel folder beside the
root stays untouched) and no staging leftovers inside it.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from adapterserve.adapters.errors import AdapterError
from adapterserve.adapters.formats import check_files
from adapterserve.adapters.store import STAGING_STALE_S, AdapterStore
from adapterserve.server.api.errors import adapter_error_status

CONFIG = b'{"peft_type": "LORA", "r": 4}'
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # content is not parsed by the store
GOOD = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
LIMIT = 64 * 1024


def status_of(err: AdapterError) -> int:
    """The HTTP status the API answers this refusal with (server.errors.ADAPTER_ERRORS)."""
    return adapter_error_status(err)[0]


# ---- archive builders (in memory) ----------------------------------------------------------
def zip_bytes(members: list[tuple], compression=zipfile.ZIP_DEFLATED) -> bytes:
    """members: (name, data) or (name, data, external_attr)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as zf:
        warnings.simplefilter("ignore")  # duplicate names are built on purpose
        for member in members:
            name, data = member[0], member[1]
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if len(member) > 2:
                info.external_attr = member[2]
            elif name.endswith("/"):
                info.external_attr = (stat.S_IFDIR | 0o755) << 16
            else:
                info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    return buf.getvalue()


def tar_bytes(members: list[tuple]) -> bytes:
    """members: (name, data) or (name, data, type, linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for member in members:
            name, data = member[0], member[1]
            info = tarfile.TarInfo(name)
            if len(member) > 2:
                info.type = member[2]
                info.linkname = member[3] if len(member) > 3 else ""
                if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    info.devmajor, info.devminor = 1, 3
                tf.addfile(info)
            elif name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def good_members(folder: str = "") -> list[tuple]:
    return [(folder + name, data) for name, data in GOOD.items()]


# ---- fixtures and helpers ------------------------------------------------------------------
@pytest.fixture
def layout(tmp_path: Path):
    """tmp/store (the root) and tmp/sentinel (must never change)."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    root = tmp_path / "store"
    return tmp_path, root, sentinel


def make_store(root: Path, **kw) -> AdapterStore:
    kw.setdefault("max_upload_bytes", LIMIT)
    kw.setdefault("max_adapters", None)
    return AdapterStore(root, **kw)


def snapshot(base: Path, exclude: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        if here == exclude or exclude in here.parents:
            dirnames[:] = []
            continue
        for entry in dirnames + filenames:
            path = here / entry
            st = path.lstat()
            out[str(path.relative_to(base))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def upload_files(store: AdapterStore, name: str, files: dict[str, bytes], replace=False) -> Path:
    with store.stage() as staging:
        store.add_files(staging, [(fn, io.BytesIO(data)) for fn, data in files.items()])
        return store.commit(staging, name, replace=replace)


def upload_archive(
    store: AdapterStore, name: str, filename: str, data: bytes, replace=False
) -> Path:
    with store.stage() as staging:
        store.add_archive(staging, filename, io.BytesIO(data))
        return store.commit(staging, name, replace=replace)


def assert_clean(store: AdapterStore) -> None:
    """No staging leftovers and no half-written adapters in the root."""
    leftovers = [p.name for p in (store.root / ".staging").iterdir()]
    assert leftovers == []
    assert {p.name for p in store.root.iterdir()} <= {".staging", ".lock", "existing"}


# ---- the negative table --------------------------------------------------------------------
# 1 MiB of zeros compresses to ~1 KiB: far over the 64 KiB extracted cap.
ZIP_BOMB = zip_bytes(
    [("adapter_config.json", CONFIG), ("adapter_model.safetensors", bytes(1 << 20))]
)
TAR_BOMB = tar_bytes(
    [("adapter_config.json", CONFIG), ("adapter_model.safetensors", bytes(1 << 20))]
)
TAR_SUM_OVER = tar_bytes(
    [
        (name, bytes(30_000))
        for name in ("adapter_config.json", "README.md", "adapter_model.safetensors")
    ]
)


def pax_bomb() -> bytes:
    """A tar whose pax header alone decompresses past the cap (before any member data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("adapter_config.json")
        info.pax_headers = {"comment": "x" * (1 << 20)}
        info.size = len(CONFIG)
        tf.addfile(info, io.BytesIO(CONFIG))
    return buf.getvalue()


LNK = (stat.S_IFLNK | 0o777) << 16
# What a hub download holds beside the adapter: dropped, never written.
EXTRAS = [
    ("tokenizer.json", b"{}"),
    ("special_tokens_map.json", b"{}"),
    ("training_args.bin", b"\x80\x04K\x01."),
    ("adapter_model.bin", b"\x80\x04K\x01."),
]

# id -> (action, status, param); action is ("files", {...}) or ("archive", filename, bytes)
# or ("name", name).
NEGATIVE = {
    "zip-slip-dotdot": (
        ("archive", "a.zip", zip_bytes([("../evil", b"x"), *good_members()])),
        400,
        "archive",
    ),
    "zip-slip-dotdot-config": (
        ("archive", "a.zip", zip_bytes([("../adapter_config.json", CONFIG)])),
        400,
        "archive",
    ),
    "zip-absolute": (
        ("archive", "a.zip", zip_bytes([("/tmp/adapter_config.json", CONFIG)])),
        400,
        "archive",
    ),
    "zip-drive-letter": (
        ("archive", "a.zip", zip_bytes([("C:/adapter_config.json", CONFIG)])),
        400,
        "archive",
    ),
    "zip-backslash": (
        ("archive", "a.zip", zip_bytes([("..\\adapter_config.json", CONFIG)])),
        400,
        "archive",
    ),
    "zip-symlink": (
        ("archive", "a.zip", zip_bytes([("adapter_config.json", b"/etc/passwd", LNK)])),
        400,
        "archive",
    ),
    "zip-pickle-only-bin": (
        (
            "archive",
            "a.zip",
            zip_bytes([("adapter_config.json", CONFIG), ("adapter_model.bin", b"\x80\x04.")]),
        ),
        400,
        "archive",
    ),
    "zip-extras-then-slip": (
        ("archive", "a.zip", zip_bytes([*good_members(), *EXTRAS, ("x/../../evil", b"x")])),
        400,
        "archive",
    ),
    "zip-pickle-pt": (
        ("archive", "a.zip", zip_bytes([("x/adapter_config.json", CONFIG), ("x/model.pt", b"")])),
        400,
        "archive",
    ),
    "zip-nested-two-folders": (
        ("archive", "a.zip", zip_bytes(good_members("a/b/"))),
        400,
        "archive",
    ),
    "zip-two-top-folders": (
        (
            "archive",
            "a.zip",
            zip_bytes([("a/adapter_config.json", CONFIG), ("b/adapter_model.safetensors", b"")]),
        ),
        400,
        "archive",
    ),
    "zip-duplicate-member": (
        ("archive", "a.zip", zip_bytes([("adapter_config.json", CONFIG)] * 2)),
        400,
        "archive",
    ),
    "zip-not-a-zip": (("archive", "a.zip", b"PK\x03\x04 garbage"), 400, "archive"),
    "zip-empty": (("archive", "a.zip", zip_bytes([])), 400, "archive"),
    "zip-bomb": (("archive", "a.zip", ZIP_BOMB), 413, "archive"),
    "zip-too-many-members": (
        ("archive", "a.zip", zip_bytes([(f"d{i}/", b"") for i in range(100)])),
        413,
        "archive",
    ),
    "tar-slip-dotdot": (
        ("archive", "a.tar.gz", tar_bytes([("../adapter_config.json", CONFIG)])),
        400,
        "archive",
    ),
    "tar-absolute": (
        ("archive", "a.tgz", tar_bytes([("/tmp/adapter_config.json", CONFIG)])),
        400,
        "archive",
    ),
    "tar-symlink": (
        (
            "archive",
            "a.tar.gz",
            tar_bytes([("adapter_config.json", b"", tarfile.SYMTYPE, "/etc/passwd")]),
        ),
        400,
        "archive",
    ),
    "tar-symlink-then-file": (
        (
            "archive",
            "a.tar.gz",
            tar_bytes(
                [
                    ("x/", b""),
                    ("x/adapter_model.safetensors", b"", tarfile.SYMTYPE, "../../../sentinel/k"),
                    ("x/adapter_model.safetensors", b"pwned"),
                ]
            ),
        ),
        400,
        "archive",
    ),
    "tar-hardlink": (
        (
            "archive",
            "a.tar.gz",
            tar_bytes([("adapter_config.json", b"", tarfile.LNKTYPE, "../sentinel/keep.txt")]),
        ),
        400,
        "archive",
    ),
    "tar-char-device": (
        ("archive", "a.tar.gz", tar_bytes([("adapter_config.json", b"", tarfile.CHRTYPE)])),
        400,
        "archive",
    ),
    "tar-fifo": (
        ("archive", "a.tar.gz", tar_bytes([("adapter_config.json", b"", tarfile.FIFOTYPE)])),
        400,
        "archive",
    ),
    "tar-pickle-only-bin": (
        (
            "archive",
            "a.tar.gz",
            tar_bytes([("x/adapter_config.json", CONFIG), ("x/pytorch_model.bin", b"\x80")]),
        ),
        400,
        "archive",
    ),
    "tar-extras-then-device": (
        (
            "archive",
            "a.tar.gz",
            tar_bytes([*good_members(), *EXTRAS, ("tokenizer.model", b"", tarfile.CHRTYPE)]),
        ),
        400,
        "archive",
    ),
    "tar-extras-then-symlink": (
        (
            "archive",
            "a.tar.gz",
            tar_bytes(
                [*EXTRAS, ("notes.md", b"", tarfile.SYMTYPE, "/etc/passwd"), *good_members()]
            ),
        ),
        400,
        "archive",
    ),
    "tar-dropped-bomb": (  # dropped members are decompressed to be skipped: still capped
        ("archive", "a.tar.gz", tar_bytes([*good_members(), ("optimizer.pt", bytes(1 << 20))])),
        413,
        "archive",
    ),
    "tar-nested-two-folders": (
        ("archive", "a.tgz", tar_bytes(good_members("a/b/"))),
        400,
        "archive",
    ),
    "tar-bomb": (("archive", "a.tar.gz", TAR_BOMB), 413, "archive"),
    "tar-sum-over-cap": (("archive", "a.tar.gz", TAR_SUM_OVER), 413, "archive"),
    "tar-pax-header-bomb": (("archive", "a.tar.gz", pax_bomb()), 413, "archive"),
    "tar-not-gzip": (("archive", "a.tar.gz", b"not gzip at all"), 400, "archive"),
    "archive-bad-extension": (
        ("archive", "a.rar", zip_bytes(good_members())),
        400,
        "archive",
    ),
    "archive-plain-tar-extension": (("archive", "a.tar", b""), 400, "archive"),
    "archive-oversize-upload": (("archive", "a.zip", os.urandom(LIMIT + 1)), 413, "archive"),
    "files-pickle-bin": (("files", {"adapter_model.bin": b"\x80\x04."}), 400, "files"),
    "files-pickle-only-with-config": (
        ("files", {"adapter_config.json": CONFIG, "adapter_model.bin": b"\x80\x04."}),
        400,
        "files",
    ),
    "files-extras-then-traversal": (
        ("files", {**GOOD, "tokenizer.json": b"{}", "../adapter_config.json": CONFIG}),
        400,
        "files",
    ),
    "files-extras-then-backslash": (
        ("files", {**GOOD, "training_args.bin": b"\x80", "x\\README.md": b""}),
        400,
        "files",
    ),
    "files-pickle-pt": (("files", {"adapter.pt": b"\x80\x04."}), 400, "files"),
    "files-ckpt": (("files", {"model.ckpt": b"\x80"}), 400, "files"),
    "files-traversal": (("files", {"../adapter_config.json": CONFIG}), 400, "files"),
    "files-absolute": (("files", {"/tmp/adapter_config.json": CONFIG}), 400, "files"),
    "files-only-a-subfolder": (("files", {"x/adapter_config.json": CONFIG}), 400, "files"),
    "files-nul": (("files", {"adapter_config.json\x00.bin": CONFIG}), 400, "files"),
    "files-none": (("files", {}), 400, "files"),
    "files-oversize": (
        ("files", {"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(LIMIT)}),
        413,
        "files",
    ),
    "name-dotdot": (("name", ".."), 400, "name"),
    "name-dotdot-inside": (("name", "a..b"), 400, "name"),
    "name-slash": (("name", "a/b"), 400, "name"),
    "name-traversal": (("name", "../sentinel"), 400, "name"),
    "name-nul": (("name", "a\x00b"), 400, "name"),
    "name-empty": (("name", ""), 400, "name"),
    "name-too-long": (("name", "a" * 65), 400, "name"),
    "name-dot-start": (("name", ".staging"), 400, "name"),
    "name-backslash": (("name", "a\\b"), 400, "name"),
    "duplicate": (("name", "existing"), 409, "name"),
}


@pytest.mark.parametrize("action,status,param", NEGATIVE.values(), ids=NEGATIVE.keys())
def test_refused_uploads(layout, action, status, param):
    tmp, root, sentinel = layout
    store = make_store(root)
    upload_files(store, "existing", GOOD)
    before_outside = snapshot(tmp, exclude=root)
    before_existing = snapshot(root / "existing", exclude=root / ".none")

    with pytest.raises(AdapterError) as excinfo:
        if action[0] == "files":
            upload_files(store, "new", action[1])
        elif action[0] == "archive":
            upload_archive(store, "new", action[1], action[2])
        else:
            upload_files(store, action[1], GOOD)
    err = excinfo.value
    assert (status_of(err), err.param) == (status, param), err.message
    assert str(tmp) not in err.message and str(root) not in err.message
    assert len(err.message) < 400

    assert snapshot(tmp, exclude=root) == before_outside
    assert (sentinel / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in sentinel.iterdir()) == ["keep.txt"]
    assert_clean(store)
    assert [a.name for a in store.list()] == ["existing"]
    assert snapshot(root / "existing", exclude=root / ".none") == before_existing


def test_refusal_names_the_member(layout):
    _, root, _ = layout
    store = make_store(root)
    long_name = "../" + "x" * 500
    with pytest.raises(AdapterError) as excinfo:
        upload_archive(store, "a", "a.zip", zip_bytes([(long_name, b"")]))
    assert "../xxx" in excinfo.value.message
    assert len(excinfo.value.message) < 400  # truncated, no echo of huge input


def test_delete_unknown_is_404(layout):
    _, root, _ = layout
    store = make_store(root)
    with pytest.raises(AdapterError) as excinfo:
        store.delete("nope")
    assert (status_of(excinfo.value), excinfo.value.param) == (404, "name")
    with pytest.raises(AdapterError) as excinfo:
        store.path("nope")
    assert status_of(excinfo.value) == 404
    with pytest.raises(AdapterError) as excinfo:
        store.delete("../sentinel")
    assert status_of(excinfo.value) == 400


def test_too_many_adapters_is_409_but_replace_is_allowed(layout):
    _, root, _ = layout
    store = make_store(root, max_adapters=2)
    upload_files(store, "a", GOOD)
    upload_files(store, "b", GOOD)
    with pytest.raises(AdapterError) as excinfo:
        upload_files(store, "c", GOOD)
    assert (status_of(excinfo.value), excinfo.value.param) == (409, "name")
    assert_clean_names = [a.name for a in store.list()]
    assert assert_clean_names == ["a", "b"]
    assert list((root / ".staging").iterdir()) == []
    upload_files(store, "b", {**GOOD, "README.md": b"v2"}, replace=True)  # same count: fine
    store.delete("a")
    upload_files(store, "c", GOOD)
    assert [a.name for a in store.list()] == ["b", "c"]


# ---- positive paths ------------------------------------------------------------------------
def test_files_upload(layout):
    _, root, _ = layout
    store = make_store(root)
    path = upload_files(store, "my-lora_1.0", GOOD)
    assert path == store.root / "my-lora_1.0" == store.path("my-lora_1.0")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == GOOD
    check_files(path)  # what load_adapter checks first: allow-listed plain files only
    [stored] = store.list()
    assert stored.name == "my-lora_1.0"
    assert stored.size_bytes == sum(len(v) for v in GOOD.values())
    assert stored.created > 0
    assert list((root / ".staging").iterdir()) == []


@pytest.mark.parametrize(
    "filename,data",
    [
        ("a.zip", zip_bytes([("my-adapter/", b""), *good_members("my-adapter/")])),
        ("a.ZIP", zip_bytes(good_members("folder/"), compression=zipfile.ZIP_STORED)),
        ("a.zip", zip_bytes(good_members())),
        ("a.tar.gz", tar_bytes(good_members())),
        ("a.tgz", tar_bytes([("./", b""), *good_members("./")])),
        ("a.tgz", tar_bytes([("x/", b""), *good_members("x/")])),
    ],
    ids=["zip-folder", "zip-stored-folder", "zip-flat", "tar-flat", "tgz-dot", "tgz-folder"],
)
def test_archive_upload(layout, filename, data):
    _, root, _ = layout
    store = make_store(root)
    path = upload_archive(store, "arch", filename, data)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == GOOD
    assert [p.name for p in (root / ".staging").iterdir()] == []


def test_duplicate_then_replace_swaps_atomically(layout):
    _, root, _ = layout
    store = make_store(root)
    upload_files(store, "a", {**GOOD, "README.md": b"old"})
    with pytest.raises(AdapterError) as excinfo:
        upload_files(store, "a", {"adapter_config.json": b"new"})
    assert status_of(excinfo.value) == 409
    assert (root / "a" / "README.md").read_bytes() == b"old"

    upload_archive(store, "a", "a.zip", zip_bytes([("adapter_config.json", b"new")]), replace=True)
    assert {p.name: p.read_bytes() for p in (root / "a").iterdir()} == {
        "adapter_config.json": b"new"
    }
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [
        ".lock",
        ".replaced",
        ".staging",
    ]
    assert list((root / ".replaced").iterdir()) == []
    # replace=true on a new name just creates it
    upload_files(store, "b", GOOD, replace=True)
    assert [a.name for a in store.list()] == ["a", "b"]


def test_delete_removes(layout):
    _, root, _ = layout
    store = make_store(root)
    upload_files(store, "a", GOOD)
    store.delete("a")
    assert store.list() == [] and not store.exists("a")
    assert not (root / "a").exists()


def test_survives_restart_and_cleans_leftovers(layout):
    _, root, _ = layout
    store = make_store(root)
    upload_files(store, "keep", GOOD)
    # Simulate a crash: a half-filled staging dir, a half-done delete, and a replace that
    # crashed after moving the old version aside (the name is missing from the root).
    leftover = store.new_staging()
    (leftover / "adapter_config.json").write_bytes(b"partial")
    (root / ".staging" / "x.upload").write_bytes(b"partial archive")
    old = time.time() - STAGING_STALE_S - 60  # untouched since: a crashed upload's
    for path in (leftover / "adapter_config.json", leftover, root / ".staging" / "x.upload"):
        os.utime(path, (old, old))
    in_progress = store.new_staging()  # another process's upload (cluster replicas share it)
    (in_progress / "adapter_config.json").write_bytes(b"being written")
    (root / ".deleted" / "u1" / "gone").mkdir(parents=True)
    (root / ".replaced" / "u2" / "swapped").mkdir(parents=True)
    (root / ".replaced" / "u2" / "swapped" / "adapter_config.json").write_bytes(b"old")
    (root / ".replaced" / "u3" / "keep").mkdir(parents=True)  # the new one is in place

    again = make_store(root)
    assert [a.name for a in again.list()] == ["keep", "swapped"]
    assert (root / "swapped" / "adapter_config.json").read_bytes() == b"old"
    assert {p.name: p.read_bytes() for p in (root / "keep").iterdir()} == GOOD
    assert list((root / ".staging").iterdir()) == [in_progress]
    assert not (root / ".deleted").exists() and not (root / ".replaced").exists()


def test_a_replace_in_progress_elsewhere_is_not_undone_by_a_starting_store(layout):
    """Processes sharing a root (cluster replicas): a store starting while another holds the
    lock mid-replace (old version aside, new not yet in) waits for it instead of putting the
    old version back."""
    import threading

    _, root, _ = layout
    store = make_store(root)
    upload_files(store, "swap", GOOD)
    started = []
    with store._lock:  # as commit(replace=True) holds it between its two renames
        holder = root / ".replaced" / "u9"
        holder.mkdir(parents=True)
        os.rename(root / "swap", holder / "swap")
        thread = threading.Thread(target=lambda: started.append(make_store(root)))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # the new store's recovery waits for the lock
        staging = store.new_staging()
        (staging / "adapter_config.json").write_bytes(b"new")
        os.rename(staging, root / "swap")
        shutil.rmtree(root / ".replaced")
    thread.join(10)
    assert started and (root / "swap" / "adapter_config.json").read_bytes() == b"new"


def test_stage_removes_uncommitted_and_failed(layout):
    _, root, _ = layout
    store = make_store(root)
    with store.stage() as staging:
        store.add_files(staging, [("adapter_config.json", io.BytesIO(CONFIG))])
    assert not staging.exists()
    with pytest.raises(RuntimeError), store.stage() as staging:
        raise RuntimeError("validation failed")
    assert not staging.exists()
    with pytest.raises(ValueError):  # only the store's own staging dirs are accepted
        store.add_files(root / "..", [])


# ---- files outside the allow-list ------------------------------------------------------------
def test_extra_files_are_dropped_unwritten(layout):
    _, root, _ = layout
    store = make_store(root)
    extras = [*EXTRAS, ("x/adapter_config.json", b"{}"), ("./README.md", b"hi")]
    with store.stage() as staging:
        uploads = [*GOOD.items(), *extras]
        ignored = store.add_files(staging, [(name, io.BytesIO(data)) for name, data in uploads])
        path = store.commit(staging, "hub")
    assert ignored == [name for name, _ in extras]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == GOOD
    assert check_files(path) == []
    assert store.list()[0].size_bytes == sum(len(v) for v in GOOD.values())


CHECKPOINT = [("checkpoint-100/adapter_model.safetensors", b"old"), ("checkpoint-100/x.pt", b"")]


@pytest.mark.parametrize(
    "filename,members,ignored",
    [
        (
            "hub.zip",
            [("checkpoint-100/", b""), *CHECKPOINT, *good_members(), *EXTRAS],
            [name for name, _ in [*CHECKPOINT, *EXTRAS]],
        ),
        (
            "hub.zip",
            [*[(f"hub/{n}", d) for n, d in [*EXTRAS, *CHECKPOINT]], *good_members("hub/")],
            [f"hub/{n}" for n, _ in [*EXTRAS, *CHECKPOINT]],
        ),
        (
            "hub.tar.gz",
            [*EXTRAS, ("checkpoint-100/", b""), *CHECKPOINT, *good_members()],
            [name for name, _ in [*EXTRAS, *CHECKPOINT]],
        ),
        (  # a folder with adapter files first: the top level still wins
            "hub.tgz",
            [("b/adapter_config.json", b"{}"), *good_members()],
            ["b/adapter_config.json"],
        ),
        (
            "hub.zip",
            [*good_members("a/b/"), *good_members("c/")],
            [f"a/b/{n}" for n in GOOD],
        ),
    ],
    ids=["zip-flat", "zip-folder", "tar-flat", "tgz-top-level-wins", "zip-nested-dropped"],
)
def test_archive_extras_are_dropped_unwritten(layout, filename, members, ignored):
    _, root, _ = layout
    store = make_store(root)
    data = zip_bytes(members) if filename.endswith(".zip") else tar_bytes(members)
    with store.stage() as staging:
        dropped = store.add_archive(staging, filename, io.BytesIO(data))
        path = store.commit(staging, "hub")
    assert dropped == ignored
    assert {p.name: p.read_bytes() for p in path.iterdir()} == GOOD
    assert [p.name for p in (root / ".staging").iterdir()] == []


def test_dropped_zip_members_are_never_decompressed(layout, monkeypatch):
    """A dropped member far over the extracted cap (1 MiB of zeros, ~1 KiB compressed) is
    neither decompressed nor counted; only the adapter's files are opened."""
    _, root, _ = layout
    store = make_store(root)
    data = zip_bytes([*good_members(), ("optimizer.pt", bytes(1 << 20))])
    assert len(data) < LIMIT < 1 << 20
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spying_open(self, member, *args, **kwargs):
        opened.append(member.filename if isinstance(member, zipfile.ZipInfo) else member)
        return real_open(self, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spying_open)
    path = upload_archive(store, "hub", "hub.zip", data)
    assert sorted(opened) == sorted(GOOD)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == GOOD
