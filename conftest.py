"""How pytest runs the notebooks (``--nbval-lax``): each in a fresh scratch folder, its cells in order.

The notebooks write their store (``runs/``) and ``figures/`` relative to the kernel's working folder,
which nbval sets to the notebook's own folder; run there, a second test run would find the first one's
results and test loading instead of computing, and the checkout would fill with generated files.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

try:
    import nbval.plugin as nbval_plugin
except ImportError:  # nbval is a test extra; without it there are no notebook items to look after
    nbval_plugin = None


def _scratch_kernel_class(scratch_root: Path):
    """nbval's kernel class, started in a new folder under ``scratch_root`` instead of the notebook's folder."""

    class ScratchKernel(nbval_plugin.RunningKernel):
        def __init__(self, kernel_name, cwd=None, **kwargs):
            folder = tempfile.mkdtemp(prefix=f"{Path(cwd or '.').name}-", dir=scratch_root)
            super().__init__(kernel_name, cwd=folder, **kwargs)

    return ScratchKernel


def pytest_configure(config: pytest.Config) -> None:
    if nbval_plugin is None:
        return
    if not hasattr(nbval_plugin, "RunningKernel"):
        raise pytest.UsageError("this nbval has no plugin.RunningKernel: conftest.py cannot give notebooks a "
                                "scratch folder; pin nbval to a version that has it")
    scratch_root = Path(tempfile.mkdtemp(prefix="datadiet-nbval-"))
    config.add_cleanup(lambda: shutil.rmtree(scratch_root, ignore_errors=True))
    original = nbval_plugin.RunningKernel
    nbval_plugin.RunningKernel = _scratch_kernel_class(scratch_root)
    config.add_cleanup(lambda: setattr(nbval_plugin, "RunningKernel", original))


def _is_notebook_cell(item: pytest.Item) -> bool:
    return nbval_plugin is not None and isinstance(item, nbval_plugin.IPyNbCell)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A random test order (pytest-randomly) may shuffle everything else; the notebooks run last, one after
    another, each notebook's cells in their order."""
    cells = sorted((item for item in items if _is_notebook_cell(item)),
                   key=lambda cell: (cell.parent.nodeid, cell.cell_num))
    items[:] = [item for item in items if not _is_notebook_cell(item)] + cells
