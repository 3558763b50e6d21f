"""Which library code a result was made with: a hash of the modules a workflow step actually runs.

The workflow's scripts are thin calls into this library, so Snakemake's own code trigger (a rule's script
changed) does not see an edit of the logic. :func:`code_hash` follows a script's (or module's) imports of
``brainfv`` statically — no import is executed, so it is cheap enough for every DAG build — and hashes the
code of every module reached, without its comments, docstrings and layout (:func:`code_text`), with the
files those modules read (the config schema). A rule passes it as a param: editing a module's code reruns
exactly the steps that run it, and a comment or docstring edit of a library module reruns nothing (a workflow
script's own edits rerun its step by Snakemake's code trigger; ``--rerun-triggers mtime input`` keeps cached
results after any other edit you know to be cosmetic). Training keys its resumable checkpoint on the same
hash, so a resumed run never mixes two versions of the training code.

Standard library only: Snakemake evaluates this in every job.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

__all__ = ["code_hash", "code_text", "modules_used"]

PACKAGE = "brainfv"
ROOT = Path(__file__).resolve().parent  # src/brainfv
# files a module reads, hashed byte for byte with it: the schema's defaults reach library functions a job calls
# without passing every value (a description edit reruns the steps too: the file is not parsed here)
DATA_FILES = {"brainfv.config": ("config.schema.yaml",)}


def _file_of(module):
    """The source file of ``brainfv.a.b`` (``a/b.py`` or ``a/b/__init__.py``), or None."""
    parts = module.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _with_parents(module):
    """``brainfv.a.b`` and the packages whose ``__init__`` importing it runs."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(path, module):
    """``brainfv`` modules imported anywhere in ``path`` (module name ``module``; None for a script)."""
    tree = _tree(path)
    if module is None:
        package = ""
    else:
        package = module if Path(path).name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if not package:
                    continue
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if _file_of(f"{target}.{a.name}") is not None}
    return {m for name in found for m in _with_parents(name) if _file_of(m) is not None}


@lru_cache(maxsize=None)
def _closure(module):
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(_imports(_file_of(m), m) - seen)
    return frozenset(seen)


def modules_used(entry: str | Path) -> list[str]:
    """The ``brainfv`` modules ``entry`` runs: a module name (``brainfv.training``) or a script's path."""
    if isinstance(entry, str) and entry.split(".")[0] == PACKAGE and _file_of(entry) is not None:
        start = {m for m in _with_parents(entry) if _file_of(m) is not None}
    else:
        start = _imports(entry, None)
    return sorted(set().union(*(_closure(m) for m in start)) if start else set())


def code_text(source: str | bytes, filename: str = "<source>") -> str:
    """``source``'s code without what cannot change a result: comments, docstrings and layout (the syntax tree,
    its docstrings dropped, written back by :func:`ast.unparse`). Anything else — a name, a literal, an error
    message, an import — is in it; given as bytes, a coding declaration decodes the literals as Python would."""
    return ast.unparse(_without_docstrings(ast.parse(source, filename=filename)))


def _without_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _tree(path):
    """A file's syntax tree without docstrings, parsed once for both its imports and its digest."""
    return _without_docstrings(ast.parse(Path(path).read_bytes(), filename=str(path)))  # bytes: the coding line


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@lru_cache(maxsize=None)
def _file_digest(path):
    return _digest(ast.unparse(_tree(path)).encode())


def code_hash(entry: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """A short hash of the code (:func:`code_text`: comments, docstrings and layout left out) of every
    ``brainfv`` module ``entry`` runs (see :func:`modules_used`) and of the files they read (:data:`DATA_FILES`,
    byte for byte), leaving out modules under the ``exclude`` prefixes (e.g. plotting, for a training
    checkpoint). The config's values are not in it: the workflow passes them to each job as params of their own.
    (The text comes from :func:`ast.unparse`: a Python release that writes some construct differently changes
    the hash once, and the steps rerun.)"""
    h = hashlib.blake2b(digest_size=8)
    mods = [m for m in modules_used(str(entry)) if not any(m == e or m.startswith(e + ".") for e in exclude)]
    for f in sorted(_file_of(m) for m in mods):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + _file_digest(f).encode())
    for name in sorted(n for m in mods for n in DATA_FILES.get(m, ())):
        h.update(name.encode() + b"\0" + _digest((ROOT / name).read_bytes()).encode())
    return h.hexdigest()


def _forget() -> None:
    """Drop every cached parse and digest (after files changed within one process: the tests)."""
    for f in (_closure, _tree, _file_digest):
        f.cache_clear()
