"""Code style: ruff (lint and import order, settings in pyproject.toml) is clean on the whole project."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    venv_ruff = Path(sys.executable).with_name("ruff")
    return str(venv_ruff) if venv_ruff.is_file() else shutil.which("ruff")


def test_ruff_is_clean():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    p = subprocess.run([ruff, "check", "src", "tests", "workflow", "benchmarks"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
