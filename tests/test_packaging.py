"""One import name: every module of ours is adapterserve.*, nothing else of ours reaches
site-packages, and the installed console script serves from outside the repository.

A transformers release that installs Hugging Face's top-level `kernels` package broke every
fresh machine while our code was importable as a bare `kernels`; these tests hold the layout
that keeps both apart (README, Architecture).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, _wait_healthy, free_port, stop_server

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("adapters", "kernels", "loadtest", "server")  # mapped to adapterserve.<folder>
SOURCES = ("adapterserve", *FOLDERS, "tests", "benchmarks")
VENV_BIN = Path(sys.executable).parent


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (functions and branches included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_every_package_folder_is_listed_and_mapped():
    """A subpackage missing from `packages` would work in the editable install and be absent
    from a regular one (the wheel, the Docker image)."""
    tool = pyproject()["tool"]["setuptools"]
    folders = {
        f"adapterserve.{init.parent.relative_to(REPO).as_posix().replace('/', '.')}"
        for folder in FOLDERS
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert set(tool["packages"]) == folders | {"adapterserve"}
    assert tool["package-dir"] == {"adapterserve": "adapterserve"} | {
        f"adapterserve.{folder}": folder for folder in FOLDERS
    }
    scripts = pyproject()["project"]["scripts"]
    assert all(target.startswith("adapterserve.") for target in scripts.values()), scripts


def test_nothing_imports_a_bare_name_of_ours():
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in python_files(*SOURCES)
        for name in imported_modules(path)
        if name.split(".")[0] in FOLDERS
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("kernels", {"adapters", "server", "loadtest"}),
        ("adapters", {"server", "loadtest"}),
        ("loadtest", {"server", "adapters", "kernels"}),  # it talks HTTP only
    ],
)
def test_the_import_direction(folder, forbidden):
    """server -> adapters -> kernels; loadtest imports none of them."""
    files = python_files(folder)
    assert len(files) > 2
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in files
        for name in imported_modules(path)
        if name.startswith("adapterserve.") and name.split(".")[1] in forbidden
    ]
    assert not offenders, offenders


def run_outside(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`code` in this venv's interpreter, started in a folder outside the repository."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | env,
    )


def test_the_installed_venv_seen_from_outside_the_repository(tmp_path):
    """`import kernels` is Hugging Face's package (when installed), no bare name of ours
    imports, and transformers' hub_kernels imports next to adapterserve."""
    code = (
        "import importlib.util, sys\n"
        "import adapterserve.kernels, adapterserve.server.cli, adapterserve.adapters.pool\n"
        f"repo = {str(REPO)!r}\n"
        "for name in ('server', 'adapters', 'loadtest', 'kernels'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    origin = spec.origin if spec else None\n"
        "    assert not (origin or '').startswith(f'{repo}/{name}/'), (name, origin)\n"
        "    print(name, origin)\n"
        "import transformers.integrations.hub_kernels\n"
        "from transformers import AutoTokenizer\n"
        "print('OK', adapterserve.kernels.__file__)\n"
    )
    done = run_outside(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["OK"] == str(REPO / "kernels" / "__init__.py")  # the editable map
    if importlib.util.find_spec("kernels") is not None:  # Hugging Face's, through transformers
        assert "site-packages" in lines["kernels"], lines


def test_run_in_the_checkout_the_root_leaves_sys_path_with_the_first_import():
    """`python -c` / `python -m` in the checkout (and Ray workers, which get the driver's working
    directory on their path: `serve --replicas N` from the checkout) have the root on sys.path;
    importing adapterserve takes it off before transformers looks for `kernels`."""
    code = (
        "import sys\n"
        f"assert {str(REPO)!r} in [__import__('os').path.abspath(p) for p in sys.path]\n"
        "import adapterserve.server.cli\n"
        "import transformers.integrations.hub_kernels\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not done.stdout.strip().startswith(str(REPO / "kernels")), done.stdout


def test_a_built_wheel_holds_only_adapterserve(tmp_path):
    """A regular install (`pip install .`, the Docker image) gets one top-level name, with the
    console's static files, and imports from that copy alone."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("adapterserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {name.split("/")[0] for name in names} == {
        "adapterserve",
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    assert "adapterserve/server/console/static/index.html" in names
    assert "adapterserve/kernels/lora.py" in names
    assert not [n for n in names if n.startswith("adapterserve/tests") or "benchmarks" in n]
    code = (
        "import adapterserve.server.cli, adapterserve.kernels.lora, adapterserve.loadtest.cli\n"
        "import adapterserve.server.console as console\n"
        "print(adapterserve.kernels.lora.__file__)\n"
        "print(console.__file__)\n"
    )
    done = run_outside(code, tmp_path, PYTHONPATH=str(tmp_path / "site"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(line.startswith(str(tmp_path / "site")) for line in done.stdout.split()), done.stdout


def serve_from_outside(tmp_path: Path, *flags: str) -> Server:
    """The installed console script, as `make serve` runs it, in a folder outside the repo."""
    port = free_port()
    log_path = tmp_path / "server.log"
    env = os.environ | {
        "ADAPTERSERVE_ADAPTER_STORE_DIR": str(tmp_path / "store"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)
    command = [str(VENV_BIN / "adapterserve"), "serve", "--port", str(port), *flags]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, None)
    _wait_healthy(server, timeout_s=600)
    return server


def complete(server: Server) -> dict:
    [model] = [m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]]
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.skipif(not (VENV_BIN / "adapterserve").exists(), reason="no console script")
def test_the_console_script_serves_from_outside_the_repository(tiny_model_dir, tmp_path):
    server = serve_from_outside(
        tmp_path, "--model", str(tiny_model_dir), "--device", "cpu", "--kv-cache-memory-mb", "16"
    )
    try:
        answer = complete(server)
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"]
    finally:
        assert stop_server(server) in (0, -signal.SIGTERM), server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(not (VENV_BIN / "adapterserve").exists(), reason="no console script")
def test_make_serve_s_command_serves_the_default_model(default_model_dir, tmp_path):
    """What `make serve` runs: no flags, the embedded GGUF (converted through transformers,
    which imports Hugging Face's `kernels`), served from outside the repository."""
    server = serve_from_outside(tmp_path)
    try:
        answer = complete(server)
        assert answer["model"] == "SmolLM2-135M-Instruct"
        assert "Paris" in answer["choices"][0]["text"], answer
    finally:
        assert stop_server(server) in (0, -signal.SIGTERM), server.log()[-4000:]


def make_dry_run(tmp_path: Path) -> str:
    # Not as a sub-make of `make test` (it would print "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(
        ["make", "-n", "install"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(
    subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make"
)
def test_make_install_builds_the_venv_anew_when_an_input_changed(tmp_path):
    """The venv is built from nothing, never reused, once the lock, pyproject.toml or the
    Makefile is newer than its stamp; with none newer, make does nothing."""
    for name in ("Makefile", "pyproject.toml", "requirements-lock.txt"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / ".installed"
    stamp.touch()
    inputs = [tmp_path / n for n in ("Makefile", "pyproject.toml", "requirements-lock.txt")]
    for path in inputs:
        os.utime(path, (1_000_000, 1_000_000))
    assert "pip" not in make_dry_run(tmp_path)  # the stamp is newer than every input
    for changed in inputs:
        for path in inputs:
            os.utime(path, (1_000_000, 1_000_000))
        os.utime(changed, None)  # now: newer than the stamp
        plan = make_dry_run(tmp_path).splitlines()
        assert plan[0] == "rm -rf .venv", (changed.name, plan)
        assert any("-r requirements-lock.txt" in line for line in plan), plan
        assert any("pip check" in line for line in plan), plan
