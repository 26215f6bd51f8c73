"""server/model stands below the engine (issue 25): the model reads a ForwardBatch
(server/model/batch.py) and imports nothing of server/engine, whose BatchBuilder builds that
batch from the scheduler's StepPlan. Importing the model used to load the scheduler, the KV
cache allocator and every adapter kind. Within adapterserve, server/model imports only itself
and kernels/ (the ops its forward calls).

adapters/pool.py stands below the adapter kinds: a kind loads a spec into the pool (Kind.load,
called by the registry), and the pool imports nothing of adapters/kinds, so the two never form
an import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "server" / "model"
POOL = ROOT / "adapters" / "pool.py"
PACKAGE = "adapterserve.server.model"
ALLOWED = (PACKAGE, "adapterserve.kernels")


def imported_modules(path: Path, package: str = PACKAGE) -> set[str]:
    """Absolute names `path` imports anywhere (functions, TYPE_CHECKING blocks included); for
    `from m import x`, `m.x` (x may be a submodule); relative imports resolved from `package`."""
    names, parts = set(), package.split(".")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) + 1 - node.level] if node.level else []
            module = ".".join([*base, *filter(None, [node.module])])
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def test_the_model_imports_only_itself_and_the_kernels_of_ours():
    files = sorted(MODEL.rglob("*.py"))
    assert len(files) > 5, files
    offenders = [
        f"{path.name}: {name}"
        for path in files
        for name in imported_modules(path)
        if within(name, "adapterserve") and not any(within(name, p) for p in ALLOWED)
    ]
    assert not offenders, offenders


def test_importing_the_model_loads_no_engine_and_no_adapter_kind(tmp_path: Path):
    """In a fresh interpreter (isolated: the editable install, not the checkout on sys.path)."""
    code = (
        "import sys\n"
        "import adapterserve.server.model.llama, adapterserve.server.model.compiled\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.startswith(('adapterserve.server.engine', 'adapterserve.adapters'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_pool_imports_no_adapter_kind():
    names = imported_modules(POOL, "adapterserve.adapters")
    assert "adapterserve.adapters.spec.AdapterSpec" in names, names  # the parse sees imports
    kinds = sorted(name for name in names if within(name, "adapterserve.adapters.kinds"))
    assert not kinds, f"adapters/pool.py imports {kinds}"


def test_importing_the_pool_loads_no_adapter_kind(tmp_path: Path):
    """Nor through another module: in a fresh, isolated interpreter, as above."""
    code = (
        "import sys\n"
        "import adapterserve.adapters.pool\n"
        "print(sorted(m for m in sys.modules if m.startswith('adapterserve.adapters.kinds')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
