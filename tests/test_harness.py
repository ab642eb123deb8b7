"""The test harness itself (the root conftest.py): notebooks run in scratch folders, their cells in order."""

import re
import shutil
from pathlib import Path

import nbformat

pytest_plugins = ["pytester"]
ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_notebooks_write_into_a_scratch_folder_and_keep_their_cell_order(pytester):
    shutil.copy(ROOT_CONFTEST, pytester.path / "conftest.py")
    folder = pytester.mkdir("notebooks")
    cells = [nbformat.v4.new_code_cell("from pathlib import Path\nPath('runs').mkdir()\nPath('runs/x').write_text('1')"),
             nbformat.v4.new_code_cell("assert Path('runs/x').read_text() == '1'\nPath('runs/x').write_text('2')"),
             nbformat.v4.new_code_cell("assert Path('runs/x').read_text() == '2'")]
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                            "display_name": "Python 3"}})
    for name in ("first", "second"):
        nbformat.write(notebook, folder / f"{name}.ipynb")
    pytester.makepyfile(**{f"test_unit_{i}": f"def test_{i}():\n    pass\n" for i in range(6)})
    for seed in (1, 2, 3):  # a few random orders
        result = pytester.runpytest_subprocess("--nbval-lax", "-p", "randomly", "-p", "no:cacheprovider",
                                               f"--randomly-seed={seed}", "-v")
        result.assert_outcomes(passed=12)
        assert sorted(p.name for p in folder.iterdir()) == ["first.ipynb", "second.ipynb"]  # nothing written here
        order = [re.search(r"(first|second)\W.*Cell (\d+) PASSED", line).groups()
                 for line in result.outlines if "Cell" in line and "PASSED" in line]
        assert order == [(n, str(i)) for n in ("first", "second") for i in range(3)]


def test_a_notebook_run_prints_no_kernel_warning(tmp_path, capfd):
    """ipykernel warns on every start that it runs over TCP unencrypted; a sweep of 50 notebooks printed it 50 times."""
    from datadiet_nb.executors.notebooks import execute_notebook

    output = tmp_path / "out.ipynb"
    execute_notebook("reproducibility", output, {"store": str(tmp_path / "store")}, scratch=tmp_path / "scratch")
    assert output.is_file()
    captured = capfd.readouterr()
    assert "without encryption" not in captured.err + captured.out
