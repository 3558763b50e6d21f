"""Shared start of every rule script: makes this checkout's library importable.

Inside a rule's own conda env the project is not pip-installed; Snakemake puts this folder on
``sys.path``, and this puts ``src/`` first, so the workflow always runs its own library.
"""
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if SRC.is_dir():
    if str(SRC) in sys.path:
        sys.path.remove(str(SRC))
    sys.path.insert(0, str(SRC))
