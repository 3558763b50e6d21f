import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from brainfv.data.cohort import prepare_cohort
from brainfv.data.lesions import SHAPES, lesion_profile, place_lesions, shape_distance, synthesize_lesions
from brainfv.data.store import Dataset, open_volumes
from brainfv.errors import ConfigError, InputDataError


@pytest.mark.parametrize("shape,volume", [
    ("sphere", 4 / 3 * np.pi * 6.5 ** 3),
    ("cube", 13 ** 3),
    ("ellipsoid", 4 / 3 * np.pi * 6.5 ** 3 * 0.55 ** 2),
])
def test_lesion_profile_has_requested_size(shape, volume):
    prof, half = lesion_profile(shape, 6.5, 1.0, edge_mm=0.5)
    assert prof.shape == (2 * half + 1,) * 3
    assert abs((prof >= 0.5).sum() - volume) / volume < 0.08
    assert prof[half, half, half] > 0.99 and prof[0, 0, 0] < 0.01


def test_cross_is_non_convex():
    prof, half = lesion_profile("cross", 6.0, 1.0, edge_mm=0.5)
    inside = prof >= 0.5
    assert inside[half, half, half + 5] and inside[half + 5, half, half]
    # the midpoint between two bar tips is outside: not convex
    assert not inside[half + 4, half + 4, half]
    d = shape_distance("cross", np.array([[0.0, 0, 0], [6.5, 0, 0], [4.0, 4.0, 0]]), 6.0)
    assert d[0] < 0 and d[1] > 0 and d[2] > 0


def test_unknown_shape():
    with pytest.raises(ConfigError, match="unknown lesion shape 'star'"):
        shape_distance("star", np.zeros((1, 3)), 1.0)


def test_placement_in_wm_with_gap():
    wm = np.zeros((40, 40, 40))
    wm[5:35, 5:35, 5:35] = 1
    rng = np.random.default_rng(0)
    centres, radii = place_lesions(wm, ["sphere"] * 3, [4.0, 4.0, 4.0], 1.0, rng, min_gap_mm=2.0)
    for c in centres:
        assert np.all(c - 4 >= 5 - 1) and np.all(c + 4 <= 35)
    for i in range(3):
        for j in range(i):
            assert np.linalg.norm(centres[i] - centres[j]) >= 4 + 4 + 2
    with pytest.raises(InputDataError, match="subject 'sx': no white-matter location"):
        place_lesions(wm, ["sphere"], [30.0], 1.0, rng, subject="sx", min_radius=20.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    cfg = small_config(grid={"voxel_size": 4.0}, cohort={"synthetic": {"n_subjects": 16}})
    prepare_cohort(cfg, out)
    return out, cfg


def test_synthesize_lesions(cohort, tmp_path):
    cdir, cfg = cohort
    cfg = {**cfg, "lesions": {**cfg["lesions"], "diameter_mm": [8, 12], "count": [1, 2], "paired": False}}
    parts = synthesize_lesions(cdir, cfg, tmp_path)
    les = pd.read_csv(tmp_path / "lesions.tsv", sep="\t", dtype={"subject": str})
    # labels balanced within each split
    for _, g in parts.groupby("split"):
        assert abs((g["lesion"] == "present").sum() - (g["lesion"] == "absent").sum()) <= 1
    assert (parts.loc[parts["lesion"] == "absent", "n_lesions"] == 0).all()
    assert (parts.loc[parts["lesion"] == "present", "n_lesions"] >= 1).all()
    assert set(les["shape"]) <= set(SHAPES)
    # lesions sit in white matter and lower the T1 signal where the mask is
    ds = Dataset(tmp_path)
    masks = open_volumes(tmp_path / "lesion_masks.npy")
    wm = open_volumes(cdir / "wm.npy")
    before = Dataset(cdir).volumes
    for r in parts[parts["n_lesions"] > 0].itertuples():
        m = np.asarray(masks[r.index]).astype(bool)
        assert m.any()
        assert (np.asarray(wm[r.cohort_index])[m] / 255).mean() > 0.5
        assert (np.asarray(ds.volumes[r.index])[m] < np.asarray(before[r.cohort_index])[m]).mean() > 0.9
    for r in parts[parts["n_lesions"] == 0].itertuples():
        assert np.array_equal(np.asarray(ds.volumes[r.index]), np.asarray(before[r.cohort_index]))
    # reproducible
    again = synthesize_lesions(cdir, cfg, tmp_path / "again")
    assert np.array_equal(np.load(tmp_path / "volumes.npy"), np.load(tmp_path / "again/volumes.npy"))
    assert list(again["lesion"]) == list(parts["lesion"])


def test_shape_labelling(cohort, tmp_path):
    cdir, cfg = cohort
    cfg = {**cfg, "lesions": {**cfg["lesions"], "labelling": "shapes", "shape_a": "sphere", "shape_b": "cross",
                              "diameter_mm": [8, 12], "count": [1, 1]}}
    parts = synthesize_lesions(cdir, cfg, tmp_path)
    assert set(parts["lesion"]) == {"sphere", "cross"}
    assert (parts["lesion_shapes"] == parts["lesion"]).all()


def test_matched_pairs(cohort, tmp_path):
    """Paired presence labelling: every subject once without and once with lesions, same split."""
    cdir, cfg = cohort
    cfg = {**cfg, "lesions": {**cfg["lesions"], "paired": True, "diameter_mm": [8, 12], "count": [1, 2]}}
    parts = synthesize_lesions(cdir, cfg, tmp_path)
    cohort_parts = Dataset(cdir).participants
    assert len(parts) == 2 * len(cohort_parts)
    for sub, g in parts.groupby("subject"):
        assert sorted(g["lesion"]) == ["absent", "present"] and g["split"].nunique() == 1
        absent = g[g["lesion"] == "absent"].iloc[0]
        assert np.array_equal(np.asarray(Dataset(tmp_path).volumes[absent["index"]]),
                              np.asarray(Dataset(cdir).volumes[absent["cohort_index"]]))
    les = pd.read_csv(tmp_path / "lesions.tsv", sep="\t", dtype={"subject": str})
    assert les["volume_id"].str.endswith("_present").all()


def test_confined_lesions_stay_in_their_region(cohort, tmp_path):
    """lesions.region_mm: every lesion centre lies inside the MNI box (so "where" has a right answer), and a box
    too small for any lesion names the key."""
    cdir, cfg = cohort
    box = [[0, 40], [-50, 20], [0, 40]]  # right hemisphere, superior white matter
    cfg = {**cfg, "lesions": {**cfg["lesions"], "diameter_mm": [8, 10], "count": [1, 2], "region_mm": box}}
    synthesize_lesions(cdir, cfg, tmp_path)
    les = pd.read_csv(tmp_path / "lesions.tsv", sep="\t", dtype={"subject": str})
    assert len(les) >= 16
    for ax, (lo, hi) in zip(("x_mm", "y_mm", "z_mm"), box):
        assert les[ax].between(lo, hi).all(), les[ax].describe()
    # and the lesion frequency map is zero outside a margin of the box (centres in it, shapes around them)
    ds = Dataset(tmp_path)
    from brainfv.data.lesions import region_mask
    grown = region_mask(ds.grid, [[lo - 8, hi + 8] for lo, hi in box])
    freq = np.asarray(nib_load(tmp_path / "lesion_frequency.nii.gz"))
    assert freq[~grown].max() == 0 and freq[grown].max() > 0
    tiny = {**cfg, "lesions": {**cfg["lesions"], "region_mm": [[-90, -88], [-120, -118], [-70, -68]]}}
    with pytest.raises(InputDataError, match="lesions.region_mm"):
        synthesize_lesions(cdir, tiny, tmp_path / "tiny")


def nib_load(path):
    import nibabel as nib

    return nib.load(path).get_fdata()
