"""brainfv.data.sources: the files a cohort is made from, found cheaply and the same way prepare_cohort does."""
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, small_config
from test_cohort import make_bids, template_image

from brainfv.data.cohort import prepare_cohort
from brainfv.data.sources import source_files
from brainfv.errors import ConfigError

SPACE = "MNI152NLin2009cAsym"


def add_image(root, sub, ses=None, space=SPACE, suffix="desc-preproc_T1w", vs=3.0):
    d = Path(root) / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    d.mkdir(parents=True, exist_ok=True)
    name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + (f"_space-{space}" if space else "") + f"_{suffix}.nii.gz"
    template_image(vs).to_filename(d / name)
    return d / name


def test_bids_source_files_are_the_images_prepare_cohort_uses(tmp_path):
    """Sessions, native-space images and brain masks: the list matches what the cohort is made from."""
    subjects = [{"sub": f"{i:02d}", "sex": "MF"[i % 2], "ses": "01", "vs": 3.0} for i in range(6)]
    root = make_bids(tmp_path / "bids", subjects)
    for i in range(6):
        add_image(root, f"{i:02d}", ses="02")                           # another session
        add_image(root, f"{i:02d}", ses="01", space=None)               # native space (no space- entity)
        add_image(root, f"{i:02d}", ses="01", space="MNI152NLin6Asym")  # another template
    mask = add_image(root, "03", ses="01", suffix="desc-brain_mask")
    add_image(root, "03", ses="02", suffix="desc-brain_mask")
    cohort = {"source": "bids", "bids": {"root": str(root), "space": SPACE, "session": "01"},
              "splits": {"train": 0.34, "val": 0.33, "test": 0.33}}
    files = source_files(small_config(cohort=cohort)["cohort"])
    parts = prepare_cohort(small_config(cohort=cohort), tmp_path / "out", log=lambda m: None)
    used = set(parts["source_path"])
    assert len(used) == 6 and all(f"_ses-01_space-{SPACE}_desc-preproc_T1w" in p for p in used)
    assert set(files) == used | {str(root / "participants.tsv"), str(mask)}
    # without filters: every subject's first image in sorted order, still what the cohort would use
    cohort["bids"].update(space=None, session=None)
    files = source_files(cohort)
    images = [f for f in files if f.endswith("T1w.nii.gz")]
    assert len(images) == 6 and all("_ses-01_desc-preproc_T1w" in f for f in images)


def test_csv_source_files(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        template_image(4.0).to_filename(d / f"s{i}.nii.gz")
    (d / "m0.nii.gz").write_bytes(b"")
    pd.DataFrame({"subject": ["s0", "s1", "s2", "s3"], "sex": ["M", "F", "M", "F"],
                  "path": ["imgs/s0.nii.gz", str(d / "s1.nii.gz"), " imgs/s2.nii.gz ", "imgs/gone.nii.gz"],
                  "mask": ["imgs/m0.nii.gz", "", "", ""]}).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    files = source_files({"source": "csv", "csv": {"table": str(tmp_path / "t.tsv"), "mask_column": "mask"}})
    # relative paths from the table's folder; a missing file is left out (the cohort reports it)
    assert files == sorted([str(tmp_path / "t.tsv"), str(d / "m0.nii.gz")]
                           + [str(d / f"s{i}.nii.gz") for i in range(3)])
    assert source_files({"source": "synthetic"}) == []


@pytest.mark.parametrize("cohort,match", [
    ({"source": "bids", "bids": {"root": None}}, "cohort.bids.root: not given"),
    ({"source": "bids", "bids": {"root": "/nonexistent/bids"}},
     "cohort.bids.root: folder not found: /nonexistent/bids"),
    ({"source": "bids", "bids": {"root": "{tmp}"}},
     "cohort.bids.participants: participants table not found: {tmp}/participants.tsv"),
    ({"source": "csv", "csv": {"table": None}}, "cohort.csv.table: not given"),
    ({"source": "csv", "csv": {"table": "{tmp}/subjects.csv"}},
     "cohort.csv.table: table not found: {tmp}/subjects.csv"),
])
def test_missing_source_is_a_config_error_naming_the_key(tmp_path, cohort, match):
    for sec in ("bids", "csv"):
        for k, v in cohort.get(sec, {}).items():
            if isinstance(v, str):
                cohort[sec][k] = v.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=match.format(tmp=tmp_path)):
        source_files(cohort)
    with pytest.raises(ConfigError, match=match.format(tmp=tmp_path)):  # the cohort says the same
        prepare_cohort(small_config(cohort=cohort), tmp_path / "out", log=lambda m: None)


def test_sources_is_light_and_fast(tmp_path):
    code = ("import sys, brainfv.data.sources; heavy = [m for m in ('torch', 'nibabel', 'pandas', 'numpy', 'scipy') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT / "src")})
    root = tmp_path / "bids"
    rows = []
    for i in range(500):  # files are only listed, never opened: empty files will do
        d = root / f"sub-{i:04d}" / "anat"
        d.mkdir(parents=True)
        (d / f"sub-{i:04d}_space-{SPACE}_desc-preproc_T1w.nii.gz").touch()
        (d / f"sub-{i:04d}_space-{SPACE}_desc-brain_mask.nii.gz").touch()
        rows.append(f"sub-{i:04d}\tM")
    (root / "participants.tsv").write_text("participant_id\tsex\n" + "\n".join(rows) + "\n")
    t = time.perf_counter()
    files = source_files({"source": "bids", "bids": {"root": str(root), "space": SPACE}})
    assert len(files) == 1001 and time.perf_counter() - t < 1.0


def _listed_bids(root, ids, space=SPACE):
    """A BIDS folder whose images are empty files (source_files lists them, never opens them)."""
    for i in ids:
        d = Path(root) / f"sub-{i}" / "anat"
        d.mkdir(parents=True)
        (d / f"sub-{i}_space-{space}_desc-preproc_T1w.nii.gz").touch()
    (Path(root) / "participants.tsv").write_text("participant_id\tsex\n" + "".join(f"sub-{i}\tM\n" for i in ids))
    return root


def test_qc_accept_entries_that_match_no_subject_are_named(tmp_path):
    import yaml

    root = _listed_bids(tmp_path / "bids", ["001", "002", "005"])
    bids = {"root": str(root)}
    for text, match in [("accept: [005]", (r"cohort.qc.accept\[0\]: 5 matches no subject: YAML read it as the "
                                           r"integer 5; write the id in quotes, '005'")),
                        ("accept: ['002', sub-005]", (r"cohort.qc.accept\[1\]: 'sub-005' matches no subject: ids are "
                                                      r"written without 'sub-', '005'")),
                        ("accept: ['009']", (r"cohort.qc.accept\[0\]: '009' matches no subject \(the cohort's "
                                             r"subjects: '001', '002', '005'\)"))]:
        with pytest.raises(ConfigError, match=match):
            source_files({"source": "bids", "bids": bids, "qc": yaml.safe_load(text)})
    assert len(source_files({"source": "bids", "bids": bids, "qc": {"accept": ["005", "002"]}})) == 4
    table = tmp_path / "subjects.csv"
    table.write_text("subject,path,sex\ns1,a.nii.gz,M\ns2,b.nii.gz,F\n")
    with pytest.raises(ConfigError, match=r"cohort.qc.accept\[0\]: 's3' matches no subject"):
        source_files({"source": "csv", "csv": {"table": str(table)}, "qc": {"accept": ["s3"]}})


def test_bids_space_or_session_that_no_file_carries_names_the_key_and_what_exists(tmp_path):
    root = _listed_bids(tmp_path / "bids", ["01", "02"])
    (root / "sub-02" / "anat" / "sub-02_desc-preproc_T1w.nii.gz").touch()  # a native-space image too
    with pytest.raises(ConfigError, match=r"cohort.bids.space: no T1w image under \S+bids has space-MNI152NLin6Asym; "
                                          r"spaces found: \['MNI152NLin2009cAsym'\] \(and images without a space- "
                                          r"entity\)"):
        source_files({"source": "bids", "bids": {"root": str(root), "space": "MNI152NLin6Asym"}})
    with pytest.raises(ConfigError, match=r"cohort.bids.session: no T1w image under \S+ has ses-2"):
        source_files({"source": "bids", "bids": {"root": str(root), "session": 2}})


def test_prepare_cohort_checks_qc_accept_before_any_image(tmp_path, monkeypatch):
    from test_cohort import MIXED, bids_cfg

    from brainfv.data import cohort

    root = make_bids(tmp_path / "bids", MIXED)
    monkeypatch.setattr(cohort, "load_volume", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = bids_cfg(root)
    cfg["cohort"]["qc"] = {"accept": [1]}
    with pytest.raises(ConfigError, match=r"cohort.qc.accept\[0\]: 1 matches no subject: YAML read it as the "
                                          r"integer 1; write the id in quotes, '01'"):
        prepare_cohort(cfg, tmp_path / "out")


def test_inputs_digest_sees_a_replacement_that_keeps_the_modification_time(tmp_path, monkeypatch):
    import os
    import shutil

    from brainfv.data import sources
    from brainfv.data.sources import inputs_digest

    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.nii.gz")
        files[-1].write_bytes(bytes([i]) * 1000)
    cache = tmp_path / "state" / "hashes.json"
    first = inputs_digest(files, cache)
    reads = []
    real = sources._file_hash
    monkeypatch.setattr(sources, "_file_hash", lambda f: reads.append(f) or real(f))
    assert inputs_digest(files, cache) == first and reads == []  # cached: nothing read again
    # cp -p / rsync -a: new content of the same size, the old modification time
    other = tmp_path / "other.nii.gz"
    other.write_bytes(b"\x07" * 1000)
    old = files[1].stat()
    os.utime(other, ns=(old.st_atime_ns, old.st_mtime_ns))
    shutil.copy2(other, files[1])
    assert files[1].stat().st_mtime_ns == old.st_mtime_ns
    changed = inputs_digest(files, cache)
    assert changed != first and reads == [str(files[1])]
    # the old content back (same mtime again): the old digest, so nothing reruns for it
    files[1].write_bytes(bytes([1]) * 1000)
    os.utime(files[1], ns=(old.st_atime_ns, old.st_mtime_ns))
    assert inputs_digest(files, cache) == first
    assert inputs_digest(files[:2], cache) != first  # a file less
