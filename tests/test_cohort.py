from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainfv.data.cohort import assign_splits, map_sex, prepare_cohort, DEFAULT_SEX_CODING
from brainfv.data.grid import Grid
from brainfv.data.store import Dataset
from brainfv.errors import InputDataError, ConfigError
from conftest import small_config


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
    again = prepare_cohort(cfg, tmp_path / "again")
    assert np.array_equal(np.load(tmp_path / "out/volumes.npy"), np.load(tmp_path / "again/volumes.npy"))
