"""Crash-safe temporaries: SIGTERM cleans up, and what SIGKILL leaves is removed by the next run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from brainfv.data.store import VolumeWriter, open_volumes
from brainfv.utils import Terminated, atomic_path, remove_stale_temporaries, terminate_cleanly

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from brainfv.utils import atomic_path, terminate_cleanly
    from brainfv.data.store import VolumeWriter
    out = sys.argv[1]
    with terminate_cleanly():
        with VolumeWriter(out + "/volumes.npy", 4, (8, 8, 8)) as w, \\
                VolumeWriter(out + "/wm.npy", 4, (8, 8, 8), dtype=np.uint8) as ww, \\
                atomic_path(out + "/participants.tsv") as tmp:
            tmp.write_text("subject\\n")
            w.append(np.zeros((8, 8, 8)))
            ww.append(np.zeros((8, 8, 8)))
            print("writing", flush=True)
            time.sleep(60)
""")


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name)


def start_writer(folder):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, env=env(), text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    p = start_writer(tmp_path)
    assert temporaries(tmp_path) == sorted([f".volumes.tmp-{p.pid}.npy", f".wm.tmp-{p.pid}.npy",
                                            f".participants.tmp-{p.pid}.tsv"])
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_removed_by_the_next_writers(tmp_path):
    p = start_writer(tmp_path)
    p.kill()
    p.wait(timeout=30)
    assert len(temporaries(tmp_path)) == 3  # SIGKILL cannot be caught
    with VolumeWriter(tmp_path / "volumes.npy", 1, (2, 2, 2)) as w:
        w.append(np.ones((2, 2, 2)))
    assert temporaries(tmp_path) == sorted([f".participants.tmp-{p.pid}.tsv", f".wm.tmp-{p.pid}.npy"])
    with atomic_path(tmp_path / "participants.tsv") as tmp:
        tmp.write_text("subject\n")
    assert temporaries(tmp_path) == [f".wm.tmp-{p.pid}.npy"]  # a writer cleans only its own file's
    assert remove_stale_temporaries(tmp_path) == [tmp_path / f".wm.tmp-{p.pid}.npy"]
    assert temporaries(tmp_path) == [] and open_volumes(tmp_path / "volumes.npy").shape == (1, 2, 2, 2)


def test_live_and_foreign_temporaries_are_kept(tmp_path):
    mine = tmp_path / f".volumes.tmp-{os.getpid()}.npy"       # this process is writing it
    alive = tmp_path / ".volumes.tmp-1.npy"                   # pid 1 always runs
    other = tmp_path / f".notes.tmp-{dead_pid()}"             # stale, but another file's: only a folder sweep
    user = tmp_path / "volumes.tmp-123.npy"                    # not hidden: not ours
    compact = tmp_path / f".volumes.tmp-{dead_pid()}-c.npy"    # VolumeWriter's compaction file, stale
    for f in (mine, alive, other, user, compact):
        f.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, "volumes") == [compact]
    assert remove_stale_temporaries(tmp_path) == [other]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in (mine, alive, user))


def test_prepare_cohort_terminated_leaves_nothing_and_cleans_a_killed_run(tmp_path):
    from conftest import small_config

    from brainfv.data.cohort import prepare_cohort

    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from conftest import small_config
        from brainfv.data.cohort import prepare_cohort
        prepare_cohort(small_config(cohort={"synthetic": {"n_subjects": 400}}), sys.argv[1], log=lambda m: None)
    """)
    out = tmp_path / "cohort"
    p = subprocess.Popen([sys.executable, "-c", script, str(out), str(ROOT / "tests")], env=env())
    deadline = time.time() + 120
    while not (out.exists() and any(f.name.startswith(".volumes.tmp-") for f in out.iterdir())):
        assert p.poll() is None and time.time() < deadline, "prepare_cohort ended before writing"
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)  # what Snakemake, SLURM and kill send
    assert p.wait(timeout=60) == 128 + signal.SIGTERM and temporaries(out) == []
    # what a SIGKILLed run leaves (see test_sigkill_leftovers_removed_by_the_next_writers) ...
    pid = dead_pid()
    stale = [f".volumes.tmp-{pid}.npy", f".wm.tmp-{pid}.npy", f".volumes.tmp-{pid}-c.npy", f".qc.tmp-{pid}.tsv",
             f".sex_effect.tmp-{pid}.nii.gz"]
    for name in stale:
        (out / name).write_bytes(b"x" * 1000)
    # ... is removed by the next run, which leaves nothing of its own
    lines = []
    prepare_cohort(small_config(cohort={"synthetic": {"n_subjects": 6}}), out, log=lines.append)
    assert temporaries(out) == [] and (out / "manifest.json").exists()
    assert sum("removed a temporary left by an interrupted run" in m for m in lines) == len(stale)


def test_terminate_cleanly_turns_sigterm_into_an_exception_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cleaned = []
    with pytest.raises(Terminated) as e:
        with terminate_cleanly():
            assert signal.getsignal(signal.SIGTERM) not in before
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                cleaned.append(True)
    assert cleaned and e.value.code == 143 and str(e.value) == "terminated by SIGTERM"
    assert isinstance(e.value, SystemExit) and not isinstance(e.value, Exception)  # not swallowed by `except Exception`
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    # SIGINT with no Python handler (as in a process started with it at SIG_DFL) is taken over too
    old_int = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated, match="SIGINT"):
            with terminate_cleanly():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, old_int)
    # a handler the caller installed is left alone (so nesting is harmless too)
    def mine(signum, frame):
        cleaned.append(signum)
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with terminate_cleanly():
            assert signal.getsignal(signal.SIGTERM) is mine
            os.kill(os.getpid(), signal.SIGTERM)
        assert cleaned[-1] == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_retained_freed_memory_stays_in_the_heap():
    """Six 4.8 MB blocks freed together: glibc trims the heap's top back to the system (its trim threshold follows
    the largest freed block), so the next round takes those pages again fault by fault; after
    ``retain_freed_memory`` the heap keeps them (``mallinfo2``'s arena: what the heap holds from the system; not
    page faults, which depend on the kernel's huge pages). Each case in its own process (the setting is the
    process's); blocks from the C allocator itself, so numpy's huge-page advice plays no part."""
    script = textwrap.dedent("""
        import ctypes, sys
        from brainfv.utils import _libc, retain_freed_memory
        libc = _libc()
        if not hasattr(libc, "mallinfo2"):
            print("skip")
            raise SystemExit
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc.mallinfo2.restype = Info
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        if sys.argv[1] == "on":
            assert retain_freed_memory()
        for _ in range(4):
            blocks = [libc.malloc(4_800_000) for _ in range(6)]
            for b in blocks:
                ctypes.memset(b, 1, 4_800_000)
            for b in blocks:
                libc.free(b)
        print(libc.mallinfo2().arena)
    """)
    held = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")}).stdout.strip()
        if out == "skip":
            pytest.skip("glibc without mallinfo2 (< 2.33)")
        held[mode] = int(out)
    assert held["on"] >= 6 * 4_800_000 > 2 * held["off"], held  # kept, versus handed back
