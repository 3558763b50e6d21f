"""Small shared helpers: atomic writes, seeding, logging with progress and ETA."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

__all__ = [
    "atomic_path",
    "write_json",
    "stable_seed",
    "get_logger",
    "Progress",
]


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Nothing is left at ``path`` (or half-written) if the block raises.
    The temporary name keeps the file's extension(s) so writers that infer a
    format from the name (nibabel, matplotlib, numpy) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if name.endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_json(obj, path):
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def stable_seed(*keys) -> int:
    """A 31-bit seed derived from ``keys`` (e.g. config seed, task, layer, unit).

    Unlike ``hash()``, the value is the same in every process and on every run.
    """
    text = "\x1f".join(str(k) for k in keys)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def get_logger(name="brainfv", logfile=None, level=logging.INFO):
    """A logger that writes timestamped lines to stderr and, if given, ``logfile``."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "_brainfv", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h._brainfv = True
        logger.addHandler(h)
    if logfile:
        logfile = str(logfile)
        if not any(getattr(h, "baseFilename", None) == os.path.abspath(logfile) for h in logger.handlers):
            Path(logfile).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(logfile, mode="a")
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    return logger


class Progress:
    """Progress of ``total`` items with rate and ETA, logged every ``every`` seconds.

    >>> p = Progress(100, "subjects", log=print, every=0)
    >>> p.update(10)  # doctest: +ELLIPSIS
    subjects 10/100 (10%) ...
    """

    def __init__(self, total, what, log=None, every=5.0, unit="it"):
        self.total, self.what, self.every, self.unit = total, what, every, unit
        self.log = log or get_logger().info
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n=1, extra="", force=False):
        self.done += n
        now = time.perf_counter()
        if force or self.done >= self.total or now - self.last >= self.every:
            self.last = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            pct = 100.0 * self.done / max(self.total, 1)
            msg = (f"{self.what} {self.done}/{self.total} ({pct:.0f}%) "
                   f"{rate:.2f} {self.unit}/s elapsed {elapsed:.1f}s ETA {eta:.1f}s")
            if extra:
                msg += f" | {extra}"
            self.log(msg)

    @property
    def elapsed(self):
        return time.perf_counter() - self.start
