"""The workflow follows the data: every image is an input of the cohort, and a configured source that does not
exist stops Snakemake before any job, naming the config key, whatever results already exist."""
import re

import pytest
import yaml
from test_cohort import MIXED, make_bids
from test_workflow import smk


@pytest.fixture
def bids_study(tmp_path):
    root = make_bids(tmp_path / "bids", MIXED)
    cfg = tmp_path / "bids.yaml"
    cfg.write_text(yaml.safe_dump({"grid": {"voxel_size": 8.0}, "results": str(tmp_path / "res"),
                                   "cohort": {"source": "bids", "bids": {"root": str(root)},
                                              "splits": {"train": 0.34, "val": 0.33, "test": 0.33}}}))
    target = str(tmp_path / "res/data/cohort/participants.tsv")
    smk(target, "--cores", "2", "--configfile", str(cfg))
    return root, cfg, target


def test_replaced_added_or_removed_image_reruns_the_cohort(bids_study):
    root, cfg, target = bids_study
    assert "Nothing to be done" in smk("-n", target, "--configfile", str(cfg)).stdout
    img = next(root.glob("sub-03/ses-02/anat/*T1w.nii*"))
    original = img.read_bytes()
    img.write_bytes(next(root.glob("sub-01/anat/*T1w.nii.gz")).read_bytes())  # replaced by another image
    p = smk("-n", target, "--configfile", str(cfg))
    assert re.search(r"^prepare_cohort\s+1$", p.stdout, re.M), p.stdout[-2000:]
    img.write_bytes(original)
    extra = root / "sub-01" / "anat" / "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"
    extra.write_bytes(next(root.glob("sub-01/anat/*T1w.nii.gz")).read_bytes())  # a new file of a subject
    p = smk("-n", target, "--configfile", str(cfg))
    assert re.search(r"^prepare_cohort\s+1$", p.stdout, re.M)
    extra.unlink()
    assert "Nothing to be done" in smk("-n", target, "--configfile", str(cfg)).stdout


def test_missing_data_root_after_an_existing_run_names_the_key(bids_study, tmp_path):
    _, cfg, target = bids_study
    bad = tmp_path / "bad.yaml"
    spec = yaml.safe_load(cfg.read_text())
    spec["cohort"]["bids"]["root"] = str(tmp_path / "does-not-exist")
    bad.write_text(yaml.safe_dump(spec))
    p = smk("-n", "--configfile", str(bad), check=False)
    assert p.returncode != 0
    assert "cohort.bids.root: folder not found" in p.stdout + p.stderr


def test_replacement_that_keeps_the_modification_time_reruns_the_cohort(bids_study):
    """cp -p, rsync -a or a restore from backup: new content under the old mtime is seen by content."""
    import os
    import shutil

    root, cfg, target = bids_study
    img = next(root.glob("sub-03/ses-02/anat/*T1w.nii*"))
    st = img.stat()
    donor = next(root.glob("sub-01/anat/*T1w.nii.gz"))
    staged = img.with_name("staged.tmp")
    shutil.copyfile(donor, staged)
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    original = img.read_bytes()
    shutil.copy2(staged, img)  # what cp -p does: new content, the old modification time
    staged.unlink()
    assert img.stat().st_mtime_ns == st.st_mtime_ns
    p = smk("-n", target, "--configfile", str(cfg))
    assert re.search(r"^prepare_cohort\s+1$", p.stdout, re.MULTILINE), p.stdout[-2000:]
    img.write_bytes(original)  # the old content back: nothing to do
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "Nothing to be done" in smk("-n", target, "--configfile", str(cfg)).stdout


def test_unknown_layer_or_units_stop_the_dry_run_before_any_job(tmp_path):
    cfg = tmp_path / "layers.yaml"
    cfg.write_text(yaml.safe_dump({"results": str(tmp_path / "res"), "featviz": {"layers": [
        {"layer": "block2.norm", "units": 2}, {"layer": "block4.norm", "units": [0, 1]},
        {"layer": "block9.norm"}]}}))
    p = smk("-n", "--configfile", str(cfg), check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "featviz.layers[2].layer: 'block9.norm' is not a layer of the study's model" in out, out[-3000:]
    assert "Job stats" not in out and "InputFunctionException" not in out
    cfg.write_text(yaml.safe_dump({"results": str(tmp_path / "res"), "featviz": {"layers": [
        {"layer": "block4.norm", "units": [0, 99]}]}}))
    p = smk("-n", "--configfile", str(cfg), check=False)
    assert p.returncode != 0 and "featviz.layers[0].units" in p.stdout + p.stderr
    assert "channels [99] out of range" in p.stdout + p.stderr
