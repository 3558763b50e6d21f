"""manifest.json of the cohort and lesion datasets: content hashes that key checkpoints on the data."""
import hashlib
import json

import numpy as np
import pytest
from conftest import small_config

from brainfv.data.cohort import prepare_cohort
from brainfv.data.lesions import synthesize_lesions
from brainfv.data.store import Dataset, file_hash, store_hash


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    cfg = small_config(cohort={"synthetic": {"n_subjects": 8}})
    for name in ("a", "b"):
        prepare_cohort(cfg, root / name, log=lambda m: None)
    prepare_cohort(small_config(seed=1, cohort={"synthetic": {"n_subjects": 8}}), root / "seed1", log=lambda m: None)
    return root, cfg


def test_cohort_manifest_describes_its_content(cohorts):
    root, _ = cohorts
    m = json.loads((root / "a" / "manifest.json").read_text())
    vols = np.load(root / "a" / "volumes.npy")
    assert m["format"] == 1 and m["hash"] == "blake2b-256"
    assert m["n_volumes"] == 8 and m["shape"] == list(vols.shape[1:]) and m["dtype"] == "<f4"
    assert m["volumes_hash"] == hashlib.blake2b(vols.tobytes(), digest_size=32).hexdigest()
    assert m["participants_hash"] == file_hash(root / "a" / "participants.tsv")
    assert set(m["files"]) == {"wm.npy", "reference.nii.gz", "mask.nii.gz", "sex_effect.nii.gz",
                               "sex_effect_regional.nii.gz", "qc.tsv"}
    assert m["files"]["wm.npy"] == store_hash(root / "a" / "wm.npy")
    assert m["files"]["mask.nii.gz"] == file_hash(root / "a" / "mask.nii.gz")


def test_fingerprint_follows_content_not_place(cohorts):
    root, _ = cohorts
    a, b, s1 = (Dataset(root / n).fingerprint() for n in ("a", "b", "seed1"))
    assert a == b  # rebuilt elsewhere with the same content
    assert a != s1  # other subjects


def test_lesion_dataset_manifest(cohorts, tmp_path):
    root, cfg = cohorts
    cfg = {**cfg, "lesions": {**cfg["lesions"], "diameter_mm": [16, 20], "count": [1, 1]}}
    synthesize_lesions(root / "a", cfg, tmp_path / "les", log=lambda m: None)
    m = Dataset(tmp_path / "les").manifest
    assert m["n_volumes"] == 16 and m["volumes_hash"] == store_hash(tmp_path / "les" / "volumes.npy")
    assert set(m["files"]) == {"lesion_masks.npy", "lesions.tsv", "lesion_frequency.nii.gz", "reference.nii.gz",
                               "mask.nii.gz", "sex_effect.nii.gz", "sex_effect_regional.nii.gz"}
    assert m["files"]["lesion_masks.npy"] == store_hash(tmp_path / "les" / "lesion_masks.npy")
    assert Dataset(tmp_path / "les").fingerprint() not in (Dataset(root / "a").fingerprint(),)
