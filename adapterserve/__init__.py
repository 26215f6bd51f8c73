"""adapterserve: one frozen base LLM, many adapters of every kind in one continuous batch.

This folder holds only the package root. Its subpackages live at the top of the repository,
where readers look for them, and pyproject.toml maps them under this one import name
(`[tool.setuptools.package-dir]`):

    adapterserve.server   <- server/    HTTP API, engine, model, evaluation, cluster, console
    adapterserve.adapters <- adapters/  adapter formats, kinds, the slot pool, the store
    adapterserve.kernels  <- kernels/   Triton kernels and their PyTorch reference
    adapterserve.loadtest <- loadtest/  the HTTP load generator

They import only by these names: the bare folder names belong to other distributions
(Hugging Face's `kernels`, which transformers imports; AdapterHub's `adapters`).
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("adapterserve")
except PackageNotFoundError:  # imported from a tree that was never installed
    __version__ = "0+unknown"


def _checkout_root() -> Path | None:
    """The source checkout this package runs from (an editable install), or None when it is an
    installed copy (whose parent, site-packages, is nobody's to touch)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "kernels" / "lora.py").is_file():
        return root
    return None


def _drop_checkout_from_sys_path() -> None:
    """With the checkout root on sys.path, its folders would be the top-level `kernels`,
    `adapters`, `server`: transformers' `import kernels` would get ours. It gets there as the
    working directory of `python -m ...` / `python -c` run in the checkout, and of Ray workers
    (Ray puts the driver's working directory on its workers' path: `serve --replicas N` from
    the checkout). Nothing of ours needs it: this package is found through the install's map,
    and every module of ours is imported after this one."""
    root = _checkout_root()
    if root is not None:
        sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != root]


_drop_checkout_from_sys_path()
