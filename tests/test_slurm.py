"""The tiny study through a real SLURM (tests/slurm/start_slurm.sh) with the SLURM profile.

Skipped when no SLURM is reachable, unless BRAINFV_REQUIRE_SLURM=1 (as in .ci/run): then it fails.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("BRAINFV_REQUIRE_SLURM") == "1"


def slurm_up():
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return p.returncode == 0 and any(s in p.stdout for s in ("idle", "mix", "alloc"))


def run(args, timeout=1500):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "snakemake"] + args, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"snakemake {' '.join(args)}:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return time.perf_counter() - t0


@pytest.mark.slurm
def test_tiny_study_on_slurm_matches_local(tmp_path):
    if not slurm_up():
        if REQUIRED:
            pytest.fail("BRAINFV_REQUIRE_SLURM=1 but no SLURM is reachable (run tests/slurm/start_slurm.sh as root)")
        pytest.skip("no SLURM here (tests/slurm/start_slurm.sh starts one)")
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    common = ["--configfile", "config/test.yaml"]
    t_local = run(["--cores", "2"] + common + ["--config", f"results={local}"])
    t_slurm = run(["--profile", "profiles/slurm", "--slurm-no-account", "--slurm-status-command", "squeue",
                   "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
                   "--slurm-logdir", str(tmp_path / "slurm-logs"), "--latency-wait", "10", "--retries", "0"]
                  + common + ["--config", f"results={slurm}"])
    print(f"tiny study: local {t_local:.0f}s, SLURM {t_slurm:.0f}s")
    (ROOT / ".tmp").mkdir(exist_ok=True)
    (ROOT / ".tmp" / "slurm_timing.txt").write_text(f"local {t_local:.1f}s\nslurm {t_slurm:.1f}s\n")
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()
                   and "logs" not in p.parts and "benchmarks" not in p.parts)
    assert len(files) > 30
    for rel in files:
        assert (slurm / rel).exists(), f"missing on SLURM: {rel}"
    import nibabel as nib

    for rel in files:
        a, b = local / rel, slurm / rel
        if rel.suffix == ".npy":
            assert np.array_equal(np.load(a), np.load(b), equal_nan=np.load(a).dtype.kind == "f"), rel
        elif rel.name.endswith(".nii.gz"):
            assert np.allclose(nib.load(a).get_fdata(), nib.load(b).get_fdata(), atol=1e-4,
                               equal_nan=True), rel  # known.nii.gz: NaN marks voxels with no known optimum
        elif rel.suffix == ".tsv":
            import pandas as pd

            timing = ["seconds", "samples_per_s", "steps_per_s"]  # wall-clock columns legitimately differ
            ta, tb = (pd.read_csv(f, sep="\t").drop(columns=timing, errors="ignore") for f in (a, b))
            pd.testing.assert_frame_equal(ta, tb, check_exact=False, rtol=1e-4, atol=1e-4, obj=str(rel))
