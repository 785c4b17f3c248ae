"""The layers of pyproject.toml's import-linter contracts hold: an upward import or a circle fails the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lint-imports on the package of the current directory (not the installed one)
LINT_THE_COPY = "import sys; sys.path.insert(0, '.'); from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_code_keeps_its_layers_and_has_no_import_circles():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    """The check sees imports placed inside functions too (they hid two circles before)."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "runner", copy / "runner", ignore=shutil.ignore_patterns("files", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    store = copy / "runner" / "store.py"
    store.write_text(store.read_text() + "\n\ndef _upward():\n    from runner.sweep import SweepSession  # noqa: F401\n")
    result = subprocess.run(
        [sys.executable, "-c", LINT_THE_COPY],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "runner.store -> runner.sweep" in result.stdout, result.stdout[-3000:]
