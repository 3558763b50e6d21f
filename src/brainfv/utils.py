"""Small shared helpers: atomic writes, crash-safe temporaries, seeding, logging with progress and ETA."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "fast_fft_size",
    "atomic_path",
    "temporary_name",
    "remove_stale_temporaries",
    "terminate_cleanly",
    "release_memory",
    "retain_freed_memory",
    "Terminated",
    "write_json",
    "stable_seed",
    "get_logger",
    "Progress",
]


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Nothing is left at ``path`` (or half-written) if the block raises.
    The temporary name (:func:`temporary_name`) keeps the file's extension(s) so writers that infer a
    format from the name (nibabel, matplotlib, numpy) still work. Temporaries of the same file left
    by a killed earlier attempt are removed first (:func:`remove_stale_temporaries`); a process
    ended by SIGTERM removes its own when it runs under :func:`terminate_cleanly`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if name.endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    remove_stale_temporaries(path.parent, stem)
    tmp = path.with_name(temporary_name(stem, suffix))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def temporary_name(stem: str, suffix: str = "") -> str:
    """The hidden temporary name ``.<stem>.tmp-<pid><suffix>`` under which a file is written."""
    return f".{stem}.tmp-{os.getpid()}{suffix}"


_TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<pid>\d+)(?:-[^./]*)?(?:\..*)?$")


def _pid_running(pid):
    """Whether a process ``pid`` exists on this machine (ours, another user's, or a zombie)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else (or cannot tell: keep)
        return True
    return True


def remove_stale_temporaries(folder: str | Path, stem: str | None = None,
                             log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove temporaries that a killed writer left in ``folder``; returns the paths removed.

    A temporary is a file or folder named like :func:`temporary_name` makes them,
    ``.<stem>.tmp-<pid>...`` (also ``VolumeWriter``'s compaction file ``...tmp-<pid>-c.npy``), whose
    writer ``pid`` is no longer a running process. With ``stem``, only temporaries of that file
    are considered (what a writer of one file does when it starts); without, every one in ``folder``
    (what a stage that owns the folder does). A temporary whose pid is running (this process, a
    concurrent writer) is kept. On a filesystem shared between machines a pid is only meaningful on
    the machine that wrote it, so writers clean only temporaries of the file they write.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if not m or (stem is not None and m["stem"] != stem) or _pid_running(int(m["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another process cleaned it at the same moment
            continue
        removed.append(path)
        if log:
            log(f"removed a temporary left by an interrupted run (pid {m['pid']}): {path}")
    return removed


class Terminated(SystemExit):
    """Raised in the main thread when the process receives SIGTERM under :func:`terminate_cleanly`.

    A :class:`SystemExit` (not an ``Exception``): ``except Exception`` blocks do not swallow it,
    ``finally`` blocks and context managers run, and an uncaught one exits with status
    ``128 + signal number`` (143 for SIGTERM), as if the signal had ended the process.
    """

    def __init__(self, signum):
        name = signal.Signals(signum).name
        super().__init__(f"terminated by {name}")
        self.signum = signum
        self.code = 128 + int(signum)

    def __str__(self):
        return f"terminated by {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def terminate_cleanly(signals: tuple = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn SIGTERM (and SIGINT, where nothing handles it) into an exception for the duration of the block.

    By default SIGTERM (what Snakemake, SLURM and ``kill`` send) ends Python without running
    ``finally`` blocks, so temporaries (``atomic_path``, ``VolumeWriter``) would stay behind. Inside
    this block the signal raises :class:`Terminated` in the main thread instead, so they are removed
    and the process then exits with status 143 (a second signal during that cleanup is ignored; SIGKILL
    still ends it). The previous handlers are restored on exit. Only a signal still at the system's
    default disposition is taken over: Python's own SIGINT handler already raises
    ``KeyboardInterrupt`` (which runs the same cleanup) and is kept, as are a handler installed by
    the caller and an ignored signal, so nesting is harmless.
    Outside the main thread (where handlers cannot be installed) it does nothing. SIGKILL cannot be
    caught: its temporaries are removed by the next writer (:func:`remove_stale_temporaries`).

    >>> with terminate_cleanly():
    ...     pass
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    raised = []

    def handler(signum, frame):
        if raised:  # a second signal while the first one's cleanup runs: let the cleanup finish
            return
        raised.append(signum)
        raise Terminated(signum)

    previous = {}
    try:
        for sig in signals:
            current = signal.getsignal(sig)
            if current is signal.SIG_DFL or current is None:
                previous[sig] = current
                signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def release_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). After
    freeing a large array glibc raises its mmap threshold, so later arrays of up to 32 MB come from the heap and
    their freed pages stay counted in the process's memory: the comparison's resident memory grew by 260 MB
    over its jobs without it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim() -> Callable | None:
    """glibc's ``malloc_trim``, or None elsewhere."""
    return getattr(_libc(), "malloc_trim", None)


@functools.lru_cache(maxsize=1)
def _libc() -> object | None:
    """The C library, looked up once (``find_library`` runs ``ldconfig``), or None."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """Keep the memory this process frees for its next allocations (glibc: allocations below 32 MB come from the
    heap, which is trimmed only when over 1 GB lies free at its top; :func:`release_memory` still hands it back
    when asked), instead of returning it to the system and taking it again — in a visualization step, every fresh
    full-resolution map zeroed or filled page fault by page fault. For a process that runs one job: the workflow's
    job runner calls it for the steps that optimise or differentiate volumes (``brainfv.jobs.base.run``,
    ``retains_freed_memory``); the library's functions never change the allocator. Each thread's arena keeps its
    own (the jobs allocate from their main thread). Measured on the 4 mm grid (the trained sex model, class
    logits, 8 elements, 1 thread, median of 4 renders of 16 steps): bf16 50.3-51.6 -> 44.2-46.3 ms a step, fp32
    57.1 -> 49.6, peak RSS 411 vs 413 MB. Returns whether it applied (False without glibc's ``mallopt``)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 30))


def write_json(obj: object, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def fast_fft_size(n: int) -> int:
    """The smallest size >= ``n`` whose only prime factors are 2, 3 and 5: an FFT of a prime size is several times
    slower (e.g. the comparison's template matching on the 4 mm grid: 47 x 56 x 47 against 48 x 60 x 48, 13.3 vs
    3.8 ms per inverse transform of 8 volumes)."""
    n = max(int(n), 1)
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 1


def stable_seed(*keys: object) -> int:
    """A 31-bit seed derived from ``keys`` (e.g. config seed, task, layer, unit).

    Unlike ``hash()``, the value is the same in every process and on every run.
    """
    text = "\x1f".join(str(k) for k in keys)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def get_logger(name: str = "brainfv", logfile: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
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

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
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
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

