import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from brainfv.data.cohort import DEFAULT_SEX_CODING, assign_splits, map_sex, prepare_cohort
from brainfv.data.grid import Grid
from brainfv.data.store import Dataset
from brainfv.errors import ConfigError, InputDataError


def template_image(voxel_size, orientation="RAS", dtype=np.float32):
    """The MNI template resampled to ``voxel_size`` mm and stored in ``orientation``."""
    from brainfv.data.template import _template_1mm

    g = Grid.from_bbox(voxel_size, [[-90, 90], [-126, 90], [-72, 108]])
    data = g.resample_image(_template_1mm()[0]) * 1000
    A = g.affine.copy()
    if orientation == "LAS":
        data = data[::-1]
        A[0, 0] = -A[0, 0]
        A[0, 3] = g.origin[0] + (g.shape[0] - 1) * voxel_size
    img = nib.Nifti1Image(data.astype(dtype), A)
    return img


def make_bids(root, subjects, space="MNI152NLin2009cAsym"):
    """subjects: list of dicts(sub, sex, ses=None, vs, orientation, dtype, ext)."""
    root = Path(root)
    rows = []
    for s in subjects:
        if s.get("in_table", True):
            rows.append({"participant_id": f"sub-{s['sub']}", "sex": s["sex"], "age": 30})
        if not s.get("image", True):
            continue
        ses = s.get("ses")
        d = root / f"sub-{s['sub']}" / (f"ses-{ses}" if ses else "") / "anat"
        d.mkdir(parents=True, exist_ok=True)
        name = f"sub-{s['sub']}" + (f"_ses-{ses}" if ses else "") + f"_space-{space}_desc-preproc_T1w"
        img = template_image(s.get("vs", 2.0), s.get("orientation", "RAS"), s.get("dtype", np.float32))
        if "transform" in s:  # misplaced in world space (a failed or missing registration)
            img = nib.Nifti1Image(np.asanyarray(img.dataobj), s["transform"] @ img.affine)
        if s.get("4d"):
            img = nib.Nifti1Image(np.stack([np.asanyarray(img.dataobj)] * 2, -1), img.affine)
        if s.get("corrupt"):
            (d / f"{name}.nii.gz").write_bytes(b"not a nifti")
        else:
            img.to_filename(d / f"{name}{s.get('ext', '.nii.gz')}")
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


MIXED = [
    {"sub": "01", "sex": "M", "vs": 2.0, "orientation": "RAS", "ext": ".nii.gz"},
    {"sub": "02", "sex": "female", "vs": 1.5, "orientation": "LAS", "dtype": np.int16, "ext": ".nii"},
    {"sub": "03", "sex": "m", "vs": 3.0, "orientation": "LAS", "ses": "02"},
    {"sub": "04", "sex": "F", "vs": 2.0, "dtype": np.int16, "ses": "01"},
    {"sub": "05", "sex": "male", "vs": 2.5, "ext": ".nii"},
    {"sub": "06", "sex": "f", "vs": 2.0, "orientation": "LAS"},
]


def test_splits_stratified_disjoint_reproducible():
    sex = np.array(["M"] * 30 + ["F"] * 20)
    a = assign_splits(sex, {"train": 0.6, "val": 0.2, "test": 0.2}, 7)
    b = assign_splits(sex, {"train": 0.6, "val": 0.2, "test": 0.2}, 7)
    c = assign_splits(sex, {"train": 0.6, "val": 0.2, "test": 0.2}, 8)
    assert (a == b).all() and not (a == c).all()
    assert set(a) == {"train", "val", "test"}
    for s in ("M", "F"):
        counts = pd.Series(a[sex == s]).value_counts()
        assert counts["train"] == round(0.6 * (sex == s).sum())
    with pytest.raises(InputDataError, match="too few subjects.*'F'"):
        assign_splits(["M"] * 5 + ["F"] * 2, {"train": 0.6, "val": 0.2, "test": 0.2}, 1)
    with pytest.raises(ConfigError, match="sum to 1"):
        assign_splits(sex, {"train": 0.6, "val": 0.6, "test": 0.2}, 1)


def test_sex_codings():
    assert map_sex("male", DEFAULT_SEX_CODING, "s") == "M"
    assert map_sex("f", DEFAULT_SEX_CODING, "s") == "F"
    ukb = {"M": [1], "F": [2]}
    assert map_sex("1", ukb, "s") == "M" and map_sex(2, ukb, "s") == "F" and map_sex("2.0", ukb, "s") == "F"
    with pytest.raises(InputDataError, match="subject 'x7': unknown sex code '3'"):
        map_sex("3", ukb, "x7")


def test_bids_mixed_dataset_is_ingested(tmp_path):
    root = make_bids(tmp_path / "bids", MIXED)
    cfg = small_config(cohort={"source": "bids", "bids": {"root": str(root)},
                               "splits": {"train": 0.34, "val": 0.33, "test": 0.33}})
    parts = prepare_cohort(cfg, tmp_path / "out")
    assert sorted(parts["subject"]) == ["01", "02", "03", "04", "05", "06"]
    assert dict(zip(parts["subject"], parts["sex"])) == {"01": "M", "02": "F", "03": "M", "04": "F", "05": "M",
                                                         "06": "F"}
    ds = Dataset(tmp_path / "out")
    v = ds.volumes
    # every subject, whatever its orientation/voxel size/dtype, lands on the same anatomy
    ref = np.asarray(v[0])
    for i in range(1, len(parts)):
        r = np.corrcoef(ref[ds.mask], np.asarray(v[i])[ds.mask])[0, 1]
        assert r > 0.95, (parts["subject"][i], r)
        inside = np.asarray(v[i])[ds.mask]
        assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-2  # z-scored in the mask
    assert (tmp_path / "out" / "sex_effect.nii.gz").exists()


@pytest.mark.parametrize("problem,match", [
    ({"sub": "07", "sex": "M", "image": False}, "'07'.*no T1w image"),
    ({"sub": "07", "sex": "M", "in_table": False}, "'07'.*image without a row"),
    ({"sub": "07", "sex": "X"}, "'07'.*unknown sex code 'X'"),
    ({"sub": "07", "sex": "M", "corrupt": True}, "'07'.*cannot read"),
])
def test_bids_problems_named_and_skippable(tmp_path, problem, match):
    root = make_bids(tmp_path / "bids", MIXED + [problem])
    cfg = small_config(cohort={"source": "bids", "bids": {"root": str(root)},
                               "splits": {"train": 0.34, "val": 0.33, "test": 0.33}})
    with pytest.raises(InputDataError, match=match):
        prepare_cohort(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "volumes.npy").exists()  # nothing half-written
    assert not list((tmp_path / "out").glob(".*tmp*"))
    cfg["cohort"]["on_missing"] = "skip"
    parts = prepare_cohort(cfg, tmp_path / "out")
    assert "07" not in set(parts["subject"]) and len(parts) == 6
    qc = pd.read_csv(tmp_path / "out" / "qc.tsv", sep="\t", dtype={"subject": str})
    assert qc.loc[qc["subject"] == "07", "status"].item() == "skipped"


def test_bids_duplicate_ids(tmp_path):
    root = make_bids(tmp_path / "bids", MIXED)
    t = pd.read_csv(root / "participants.tsv", sep="\t")
    pd.concat([t, t.iloc[:1]]).to_csv(root / "participants.tsv", sep="\t", index=False)
    cfg = small_config(cohort={"source": "bids", "bids": {"root": str(root)}})
    with pytest.raises(InputDataError, match="subject '01': duplicate subject id: 2 rows of participants.tsv"):
        prepare_cohort(cfg, tmp_path / "out")


def test_csv_source_with_numeric_coding(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rows = []
    for i in range(6):
        template_image(2.0, "LAS" if i % 2 else "RAS").to_filename(d / f"s{i}.nii.gz")
        rows.append({"id": f"s{i}", "file": f"imgs/s{i}.nii.gz", "gender": 1 + i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    cfg = small_config(cohort={"source": "csv", "sex_coding": {"M": [1], "F": [2]},
                               "csv": {"table": str(tmp_path / "table.csv"), "subject_column": "id",
                                       "path_column": "file", "sex_column": "gender"},
                               "splits": {"train": 0.34, "val": 0.33, "test": 0.33}})
    parts = prepare_cohort(cfg, tmp_path / "out")
    assert list(parts["sex"]) == ["M", "F"] * 3
    # not in template space: a clear message
    nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.diag([1, 1, 1, 1.0])).to_filename(d / "s0.nii.gz")
    with pytest.raises(InputDataError, match="subject 's0'.*template"):
        prepare_cohort(cfg, tmp_path / "out2")


def test_synthetic_cohort_has_planted_effect(tmp_path):
    cfg = small_config(cohort={"synthetic": {"n_subjects": 12}})
    parts = prepare_cohort(cfg, tmp_path / "out")
    assert len(parts) == 12 and set(parts["sex"]) == {"M", "F"}
    assert parts["cohort"].str.contains("synthetic").all()
    eff = nib.load(tmp_path / "out" / "sex_effect.nii.gz").get_fdata()
    assert np.abs(eff).max() > 0.3
    # males are larger on average (global volume effect)
    assert parts.groupby("sex")["brain_voxels"].mean()["M"] > parts.groupby("sex")["brain_voxels"].mean()["F"]
    prepare_cohort(cfg, tmp_path / "again")
    assert np.array_equal(np.load(tmp_path / "out/volumes.npy"), np.load(tmp_path / "again/volumes.npy"))


# --- data integrity: every problem at once, checked early, nothing silently wrong --------------------

SPLITS3 = {"train": 0.34, "val": 0.33, "test": 0.33}


def rigid(degrees=0.0, shift_mm=(0.0, 0.0, 0.0), scale=1.0, axis="x"):
    """A world-space transform: rotation about ``axis`` (degrees), then shift (mm), isotropic scale."""
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler(axis, degrees, degrees=True).as_matrix() * scale
    T[:3, 3] = shift_mm
    return T


def bids_cfg(root, **cohort):
    return small_config(cohort={"source": "bids", "bids": {"root": str(root)}, "splits": SPLITS3, **cohort})


def read_qc(out):
    return pd.read_csv(Path(out) / "qc.tsv", sep="\t", dtype={"subject": str}).set_index("subject")


@pytest.mark.parametrize("case,transform,expect_pass", [
    ("template", np.eye(4), True),
    ("scaled 10%", rigid(scale=1.1), True),
    ("rotated 5 deg", rigid(5), True),
    ("rotated 15 deg", rigid(15), True),
    ("shifted 5 mm", rigid(shift_mm=(0, 5, 0)), True),
    ("shifted 20 mm", rigid(shift_mm=(0, 20, 0)), False),
    ("rotated 15 deg, shifted 20 mm", rigid(15, (0, 20, 0)), False),
    ("not registered (50 mm off)", rigid(shift_mm=(0, 30, 40)), False),
])
def test_template_similarity_separates_misregistration(case, transform, expect_pass):
    from brainfv.data.cohort import DEFAULT_QC, template_similarity

    grid = Grid.from_bbox(4.0, [[-78, 78], [-114, 78], [-72, 84]])
    img = template_image(2.0)
    corr, coverage = template_similarity(grid.resample(np.asanyarray(img.dataobj), transform @ img.affine), grid)
    assert (corr >= DEFAULT_QC["min_template_corr"]) == expect_pass, (case, corr)
    assert coverage > 0.7, (case, coverage)  # coverage alone does not see it


def test_template_similarity_tolerates_bias_and_noise():
    from brainfv.data.cohort import DEFAULT_QC, template_similarity

    grid = Grid.from_bbox(4.0, [[-78, 78], [-114, 78], [-72, 84]])
    img = template_image(2.0)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    xyz = Grid.from_bbox(2.0, [[-90, 90], [-126, 90], [-72, 108]]).world_coords(np.indices(data.shape).reshape(3, -1).T)
    bias = (1 + 0.3 * np.sin(xyz[:, 0] / 60) * np.cos(xyz[:, 1] / 80) + 0.15 * xyz[:, 2] / 100).reshape(data.shape)
    noise = np.random.default_rng(0).normal(0, 0.05 * data[data > 0].mean(), data.shape) * (data > 0)
    corr, _ = template_similarity(grid.resample(data * bias + noise, img.affine), grid)
    assert 0.75 < corr < 0.95 and corr > DEFAULT_QC["min_template_corr"]
    assert template_similarity(grid.resample(data, img.affine), grid)[0] > 0.99


def test_misregistered_image_is_an_error_naming_subject_file_value_and_key(tmp_path):
    bad = {"sub": "07", "sex": "M", "transform": rigid(15, (0, 20, 0))}
    fine = {"sub": "08", "sex": "F", "transform": rigid(2, (0, 2, 0), 1.02)}
    root = make_bids(tmp_path / "bids", MIXED + [bad, fine])
    cfg = bids_cfg(root)
    with pytest.raises(InputDataError) as e:
        prepare_cohort(cfg, tmp_path / "out")
    msg = str(e.value)
    assert re.search(r"subject '07': \S+sub-07_space-\S+_T1w\.nii\.gz correlates with the template at r = 0\.[0-4]\d",
                     msg), msg
    assert "cohort.qc.min_template_corr: 0.5" in msg and "cohort.qc.accept" in msg
    assert "'08'" not in msg and "1 problem(s)" in msg
    assert not (tmp_path / "out" / "volumes.npy").exists() and not list((tmp_path / "out").glob(".*"))
    # the documented override: accept the subject after checking it
    cfg["cohort"]["qc"] = {"accept": ["07"]}
    parts = prepare_cohort(cfg, tmp_path / "out")
    assert len(parts) == 8
    qc = read_qc(tmp_path / "out")
    assert (qc["status"] == "ok").all() and qc["template_corr"].notna().all() and qc["coverage"].notna().all()
    assert qc.loc["07", "template_corr"] < 0.5 and "accepted by cohort.qc.accept" in qc.loc["07", "reason"]
    assert qc.drop(["07", "08"])["template_corr"].min() > 0.98 and qc.loc["08", "template_corr"] > 0.8
    # or skip it: listed in qc.tsv with the reason
    cfg["cohort"].update(qc={}, on_missing="skip")
    parts = prepare_cohort(cfg, tmp_path / "out")
    qc = read_qc(tmp_path / "out")
    assert "07" not in set(parts["subject"]) and qc.loc["07", "status"] == "skipped"
    assert "min_template_corr" in qc.loc["07", "reason"] and len(parts) == 7
    assert qc.loc["07", "template_corr"] < 0.5 and qc["template_corr"].notna().all()


def test_sex_coding_adds_to_bids_codes(tmp_path):
    from brainfv.data.cohort import sex_coding

    merged = sex_coding({"M": [1], "F": [2]})
    assert map_sex("1", merged, "a") == "M" and map_sex("female", merged, "b") == "F"
    assert map_sex("O", merged, "c") == "O"
    assert map_sex("f", sex_coding({"M": ["f"]}), "d") == "M"  # a user code wins over its default meaning
    with pytest.raises(ConfigError, match="raw code 1 is given for both 'M' and 'F'"):
        sex_coding({"M": [1], "F": [1]})
    # the README's example on a table that mixes numeric and letter codes keeps every subject
    root = make_bids(tmp_path / "bids", [{"sub": "01", "sex": 1}, {"sub": "02", "sex": 2}, {"sub": "03", "sex": "M"},
                                         {"sub": "04", "sex": "female"}, {"sub": "05", "sex": "male"},
                                         {"sub": "06", "sex": "F"}])
    parts = prepare_cohort(bids_cfg(root, sex_coding={"M": [1], "F": [2]}), tmp_path / "out")
    assert dict(zip(parts["subject"], parts["sex"])) == {"01": "M", "02": "F", "03": "M", "04": "F", "05": "M",
                                                         "06": "F"}


def test_every_table_problem_reported_at_once_before_any_image_is_loaded(tmp_path, monkeypatch):
    import brainfv.data.cohort as cohort

    problems = [{"sub": "07", "sex": "M", "image": False}, {"sub": "08", "sex": "M", "in_table": False},
                {"sub": "09", "sex": "X"}, {"sub": "10", "sex": "n/a"}]
    root = make_bids(tmp_path / "bids", MIXED + [{"sub": "11", "sex": "M"}] + problems)
    t = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    pd.concat([t, t.iloc[:1]]).to_csv(root / "participants.tsv", sep="\t", index=False)  # '01' twice
    loaded = []
    monkeypatch.setattr(cohort, "load_volume", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(
        AssertionError("an image was loaded")))
    with pytest.raises(InputDataError) as e:
        prepare_cohort(bids_cfg(root), tmp_path / "out")
    msg = str(e.value)
    assert "5 problem(s) with 5 subject(s)" in msg
    for line in ("subject '01': duplicate subject id: 2 rows of participants.tsv",
                 "subject '07': no T1w image found under", "subject '08': image without a row in participants.tsv",
                 "subject '09': unknown sex code 'X' in column 'sex'", "subject '10': no value in column 'sex'"):
        assert line in msg, (line, msg)
    assert "Known sex codes: M: M, m, male" in msg and "cohort.on_missing: skip" in msg
    assert loaded == [] and not list((tmp_path / "out").iterdir())
    # skip: every skipped subject and every kept one in qc.tsv
    monkeypatch.undo()
    cfg = bids_cfg(root, on_missing="skip")
    parts = prepare_cohort(cfg, tmp_path / "out")
    qc = read_qc(tmp_path / "out")
    assert sorted(parts["subject"]) == ["02", "03", "04", "05", "06", "11"]
    assert set(qc.index) == {"01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11"}
    assert (qc.loc[["01", "07", "08", "09", "10"], "status"] == "skipped").all()
    assert (qc.loc[["02", "03", "04", "05", "06", "11"], "status"] == "ok").all()
    assert "duplicate" in qc.loc["01", "reason"] and "unknown sex code" in qc.loc["09", "reason"]


def test_csv_missing_files_and_codes_reported_together(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rows = []
    for i in range(6):
        template_image(3.0).to_filename(d / f"s{i}.nii.gz")
        rows.append({"id": f"s{i}", "file": f"imgs/s{i}.nii.gz", "sex": "MF"[i % 2], "mask": ""})
    rows += [{"id": "s6", "file": "imgs/missing.nii.gz", "sex": "M", "mask": ""},
             {"id": "s7", "file": "imgs/s0.nii.gz", "sex": "F", "mask": "imgs/no_mask.nii.gz"},
             {"id": "s8", "file": "", "sex": "F", "mask": ""},
             {"id": "s9", "file": "imgs/s1.nii.gz", "sex": "3", "mask": ""}]
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    cfg = small_config(cohort={"source": "csv", "splits": SPLITS3,
                               "csv": {"table": str(tmp_path / "table.csv"), "subject_column": "id",
                                       "path_column": "file", "mask_column": "mask"}})
    with pytest.raises(InputDataError) as e:
        prepare_cohort(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "4 problem(s) with 4 subject(s)" in msg
    assert re.search(r"subject 's6': image file not found: \S+missing\.nii\.gz", msg)
    assert re.search(r"subject 's7': mask file not found: \S+no_mask\.nii\.gz", msg)
    assert "subject 's8': no image path in column 'file'" in msg and "subject 's9': unknown sex code '3'" in msg


def test_every_image_problem_reported_at_once_and_nothing_written(tmp_path):
    problems = [{"sub": "07", "sex": "M", "corrupt": True}, {"sub": "08", "sex": "F", "4d": True},
                {"sub": "09", "sex": "M", "transform": rigid(shift_mm=(0, 30, 40))}]
    root = make_bids(tmp_path / "bids", MIXED + problems)
    with pytest.raises(InputDataError) as e:
        prepare_cohort(bids_cfg(root), tmp_path / "out")
    msg = str(e.value)
    assert "3 problem(s) with 3 subject(s); nothing was written" in msg
    assert re.search(r"subject '07': cannot read NIfTI \S+sub-07", msg)
    assert re.search(r"subject '08': \S+sub-08\S+ has shape \(\d+, \d+, \d+, 2\); expected a 3D", msg)
    assert re.search(r"subject '09': \S+sub-09\S+ correlates with the template at r = ", msg)
    assert not list((tmp_path / "out").iterdir())  # no volumes, no temporaries
    parts = prepare_cohort(bids_cfg(root, on_missing="skip"), tmp_path / "out")
    qc = read_qc(tmp_path / "out")
    assert len(parts) == 6 and (qc.loc[["07", "08", "09"], "status"] == "skipped").all()
    assert "cannot read" in qc.loc["07", "reason"] and "3D" in qc.loc["08", "reason"]
    assert (qc.loc[list(parts["subject"]), "status"] == "ok").all()


def test_class_too_small_for_the_split(tmp_path, monkeypatch):
    import brainfv.data.cohort as cohort

    root = make_bids(tmp_path / "bids", MIXED + [{"sub": "07", "sex": "O"}])
    # skip: the class is left out (log warning, qc.tsv), the cohort is made
    lines = []
    parts = prepare_cohort(bids_cfg(root, on_missing="skip"), tmp_path / "out", log=lines.append)
    assert sorted(parts["subject"]) == ["01", "02", "03", "04", "05", "06"]
    qc = read_qc(tmp_path / "out")
    assert qc.loc["07", "status"] == "skipped" and "class 'O'" in qc.loc["07", "reason"]
    assert any("WARNING" in m and "class 'O'" in m for m in lines)
    # error: fails before any image is loaded, naming class, count and cohort.splits
    monkeypatch.setattr(cohort, "load_volume", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(InputDataError, match=r"subject '07': stratification class 'O' \(column 'sex', "
                                             r"cohort.stratify\) has 1 usable subject\(s\) but cohort.splits .* "
                                             r"needs at least one per split \(3\)"):
        prepare_cohort(bids_cfg(root), tmp_path / "out2")


def test_class_too_small_after_skipped_images_is_left_out_of_the_store(tmp_path):
    import hashlib

    from brainfv.data.store import Dataset

    others = [{"sub": "07", "sex": "O"}, {"sub": "08", "sex": "O", "vs": 3.0},
              {"sub": "09", "sex": "O", "corrupt": True}]
    root = make_bids(tmp_path / "bids", MIXED[:3] + others + MIXED[3:])
    parts = prepare_cohort(bids_cfg(root, on_missing="skip"), tmp_path / "out")
    assert sorted(parts["subject"]) == ["01", "02", "03", "04", "05", "06"]
    assert sorted(parts["index"]) == list(range(6))  # the O volumes written before were dropped
    ds = Dataset(tmp_path / "out")
    assert len(ds.volumes) == 6 and np.load(tmp_path / "out" / "wm.npy").shape[0] == 6
    wm_bytes = np.load(tmp_path / "out" / "wm.npy").tobytes()
    assert ds.manifest["n_volumes"] == 6
    assert ds.manifest["files"]["wm.npy"] == hashlib.blake2b(wm_bytes, digest_size=32).hexdigest()
    qc = read_qc(tmp_path / "out")
    assert (qc.loc[["07", "08", "09"], "status"] == "skipped").all() and "class 'O'" in qc.loc["07", "reason"]


def test_qc_defaults_match_the_schema():
    from brainfv.data.cohort import DEFAULT_QC

    assert small_config()["cohort"]["qc"] == DEFAULT_QC


# --- the template check relative to the cohort (issue 21) ------------------------------------------------

def _registered_like(img, seed):
    """The template image as a registered subject: a smooth bias field, noise, a residual 2 mm / 2 deg / 3%."""
    rng = np.random.default_rng(seed)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    src = Grid.from_bbox(2.0, [[-90, 90], [-126, 90], [-72, 108]])
    xyz = src.world_coords(np.indices(data.shape).reshape(3, -1).T)
    bias = (1 + rng.uniform(0.1, 0.3) * np.sin(xyz[:, 0] / rng.uniform(40, 90) + rng.uniform(0, 6))
            * np.cos(xyz[:, 1] / rng.uniform(50, 100)) + rng.uniform(-0.15, 0.15) * xyz[:, 2] / 100).reshape(data.shape)
    noise = rng.normal(0, 0.05 * data[data > 0].mean(), data.shape) * (data > 0)
    return data * bias + noise, rigid(rng.uniform(-2, 2), rng.uniform(-2, 2, 3), 1 + rng.uniform(-0.03, 0.03),
                                      axis="xyz"[seed % 3])


def test_template_outliers_relative_to_a_realistic_cohort():
    """In a cohort of registered images (0.8-0.95), a 15 mm shift or a 15 deg rotation passes the absolute
    min_template_corr but not the check relative to the cohort; no registered image fails it."""
    from brainfv.data.cohort import DEFAULT_QC, qc_outliers, template_similarity

    grid = Grid.from_bbox(4.0, [[-78, 78], [-114, 78], [-72, 84]])
    img = template_image(2.0)
    measured = {}
    for i in range(10):
        data, T = _registered_like(img, i)
        measured[f"r{i}"] = (template_similarity(grid.resample(data, T @ img.affine), grid)[0], f"r{i}.nii.gz")
    data, _ = _registered_like(img, 0)
    for name, T in (("shift15", rigid(shift_mm=(0, 15, 0))), ("rot15", rigid(15, axis="y"))):
        measured[name] = (template_similarity(grid.resample(data, T @ img.affine), grid)[0], f"{name}.nii.gz")
    assert measured["shift15"][0] > DEFAULT_QC["min_template_corr"] < measured["rot15"][0]  # the absolute bar passes
    problems = qc_outliers(measured, DEFAULT_QC)
    assert sorted(p.subject for p in problems) == ["rot15", "shift15"], measured
    med = np.median([v[0] for v in measured.values()])
    msg = next(p.reason for p in problems if p.subject == "rot15")
    assert re.match(rf"rot15\.nii\.gz correlates with the template at r = 0\.\d\d, far below the cohort's median "
                    rf"{med:.2f} \(bar 0\.\d\d: median - 6 x 0\.\d+, the robust spread of 12 subjects; "
                    r"cohort.qc.outlier_k: 6\)", msg), msg
    assert "cohort.qc.accept" in msg
    assert qc_outliers(measured, {**DEFAULT_QC, "accept": {"rot15"}})[0].subject == "shift15"
    assert not qc_outliers(measured, {**DEFAULT_QC, "outlier_k": 0})


def test_synthetic_subjects_pass_the_cohort_relative_check():
    """The synthetic cohort's own spread (0.51-0.88 on 3-4 mm grids) keeps every subject."""
    from brainfv.config import complete
    from brainfv.data.cohort import DEFAULT_QC, qc_outliers, template_similarity
    from brainfv.data.synthetic import SyntheticCohort

    cfg = complete({"grid": {"voxel_size": 4.0}})
    grid = Grid.from_config(cfg["grid"])
    sc = cfg["cohort"]["synthetic"]
    gen = SyntheticCohort(grid, 16, 0, sc["male_fraction"], sc["sex_effect"], sc["variability"])
    measured = {i: (template_similarity(gen.generate(i)["t1"], grid)[0], "synthetic") for i in range(gen.n)}
    assert min(v[0] for v in measured.values()) > DEFAULT_QC["min_template_corr"]
    assert qc_outliers(measured, DEFAULT_QC) == []


def test_misregistration_in_a_registered_cohort_is_an_error_or_skipped(tmp_path):
    """End to end: a 15 mm shift and a 15 deg rotation (both above min_template_corr) among registered images."""
    bad = [{"sub": "07", "sex": "M", "transform": rigid(shift_mm=(0, 15, 0))},
           {"sub": "08", "sex": "F", "transform": rigid(15, axis="y")}]
    root = make_bids(tmp_path / "bids", MIXED + bad)
    with pytest.raises(InputDataError) as e:
        prepare_cohort(bids_cfg(root), tmp_path / "out")
    msg = str(e.value)
    assert "2 problem(s) with 2 subject(s); nothing was written" in msg
    for sub in ("07", "08"):
        assert re.search(rf"subject '{sub}': \S+sub-{sub}_\S+ correlates with the template at r = 0\.[5-7]\d, far "
                         rf"below the cohort's median (0\.99|1\.00) \(bar 0\.8\d: median - 6 x 0\.020", msg), msg
    assert not list((tmp_path / "out").iterdir())
    parts = prepare_cohort(bids_cfg(root, on_missing="skip"), tmp_path / "out")
    qc = read_qc(tmp_path / "out")
    assert sorted(parts["subject"]) == ["01", "02", "03", "04", "05", "06"] and sorted(parts["index"]) == list(range(6))
    assert (qc.loc[["07", "08"], "status"] == "skipped").all() and "outlier_k" in qc.loc["07", "reason"]
    assert len(Dataset(tmp_path / "out").volumes) == 6
