import nibabel as nib
import numpy as np
import pytest

from brainfv.data.grid import Grid, load_volume
from brainfv.data.store import VolumeWriter, open_volumes
from brainfv.errors import ConfigError, InputDataError


def blob_image(affine, shape, world, value=10.0):
    """An image with one bright voxel block centred at world coordinate ``world``."""
    data = np.zeros(shape, np.float32)
    ijk = np.round(np.linalg.inv(affine) @ np.r_[world, 1])[:3].astype(int)
    sl = tuple(slice(c - 2, c + 3) for c in ijk)
    data[sl] = value
    return nib.Nifti1Image(data, affine)


def centroid_world(grid, vol):
    idx = np.argwhere(vol > vol.max() * 0.5).mean(0)
    return grid.world_coords(idx)


@pytest.mark.parametrize("orientation", ["RAS", "LAS", "LPI", "permuted"])
def test_resampling_preserves_world_position(orientation):
    grid = Grid.from_bbox(4.0, [[-60, 60], [-80, 60], [-50, 70]])
    shape = (60, 70, 60)
    vs = 2.0
    if orientation == "RAS":
        A = np.diag([vs, vs, vs, 1.0])
    elif orientation == "LAS":
        A = np.diag([-vs, vs, vs, 1.0])
    elif orientation == "LPI":
        A = np.diag([-vs, -vs, -vs, 1.0])
    else:  # axes stored as (y, z, x)
        A = np.array([[0, 0, vs, 0], [vs, 0, 0, 0], [0, vs, 0, 0], [0, 0, 0, 1.0]])
    # place the image so that its centre is at the origin
    centre = A[:3, :3] @ (np.array(shape) / 2)
    A[:3, 3] = -centre
    target = np.array([20.0, -30.0, 10.0])  # right, posterior, superior
    img = blob_image(A, shape, target)
    out = grid.resample_image(img)
    assert np.allclose(centroid_world(grid, out), target, atol=2.5), orientation


def test_grid_affine_is_ras_and_roundtrips():
    grid = Grid.from_bbox(3.0, [[-78, 78], [-114, 78], [-72, 84]])
    assert grid.shape == (52, 64, 52)
    assert np.all(np.diag(grid.affine)[:3] > 0)
    img = grid.to_nifti(np.zeros(grid.shape))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert Grid.from_image(img) == grid


def test_bad_grid_config():
    with pytest.raises(ConfigError, match="bbox_mm"):
        Grid.from_bbox(3.0, [[0, -1], [0, 1], [0, 1]])
    with pytest.raises(ConfigError, match="voxel_size"):
        Grid.from_bbox(0, [[0, 1], [0, 1], [0, 1]])


def test_load_volume_errors(tmp_path):
    with pytest.raises(InputDataError, match="subject 's1'.*not found"):
        load_volume(tmp_path / "nope.nii.gz", "s1")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputDataError, match="subject 's2': cannot read"):
        load_volume(bad, "s2")
    nib.Nifti1Image(np.random.rand(5, 5, 5, 3).astype(np.float32), np.eye(4)).to_filename(tmp_path / "4d.nii")
    with pytest.raises(InputDataError, match="3D"):
        load_volume(tmp_path / "4d.nii", "s3")
    d = np.random.rand(5, 5, 5).astype(np.float32)
    d[1, 1, 1] = np.nan
    nib.Nifti1Image(d, np.eye(4)).to_filename(tmp_path / "nan.nii")
    with pytest.raises(InputDataError, match="NaN"):
        load_volume(tmp_path / "nan.nii", "s4")
    nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)).to_filename(tmp_path / "const.nii")
    with pytest.raises(InputDataError, match="constant"):
        load_volume(tmp_path / "const.nii", "s5")
    # a 4D image with one volume is fine
    nib.Nifti1Image(np.random.rand(5, 5, 5, 1).astype(np.float32), np.eye(4)).to_filename(tmp_path / "one.nii")
    assert load_volume(tmp_path / "one.nii")[0].shape == (5, 5, 5)


def test_volume_writer_streams_and_is_atomic(tmp_path):
    path = tmp_path / "v.npy"
    with VolumeWriter(path, 5, (3, 4, 5)) as w:
        for i in range(3):  # two subjects skipped: the file is compacted
            w.append(np.full((3, 4, 5), i, np.float32))
        assert not path.exists()  # nothing visible before success
    v = open_volumes(path)
    assert v.shape == (3, 3, 4, 5) and float(v[2].mean()) == 2.0
    with pytest.raises(RuntimeError):
        with VolumeWriter(tmp_path / "w.npy", 2, (2, 2, 2)) as w:
            w.append(np.zeros((2, 2, 2)))
            raise RuntimeError("killed")
    assert list(tmp_path.glob("*w*.npy")) == []


def _blake(*arrays):
    import hashlib

    h = hashlib.blake2b(digest_size=32)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_volume_writer_hash_is_the_content_in_order(tmp_path):
    from brainfv.data.store import store_hash

    vols = [np.full((3, 4, 5), i, np.float32) + np.arange(60, dtype=np.float32).reshape(3, 4, 5) for i in range(4)]
    with VolumeWriter(tmp_path / "a.npy", 4, (3, 4, 5)) as w:
        assert w.hash is None
        for v in vols:
            w.append(v)
    assert w.hash == _blake(*vols) == store_hash(tmp_path / "a.npy")
    with VolumeWriter(tmp_path / "b.npy", 7, (3, 4, 5)) as w2:  # 3 reserved places unused: compacted
        for v in vols:
            w2.append(v)
    assert w2.hash == w.hash
    with VolumeWriter(tmp_path / "c.npy", 4, (3, 4, 5)) as w3:  # order matters
        for v in vols[::-1]:
            w3.append(v)
    assert w3.hash != w.hash
    with VolumeWriter(tmp_path / "d.npy", 5, (3, 4, 5)) as w4:  # dropped volumes leave file and hash
        for v in [vols[0], vols[1], np.zeros((3, 4, 5)), vols[2], vols[3]]:
            w4.append(v)
        w4.drop([2])
        assert [w4.final_index(i) for i in range(5)] == [0, 1, None, 2, 3]
    assert w4.hash == w.hash and np.array_equal(np.load(tmp_path / "d.npy"), np.stack(vols))


def test_dataset_fingerprint_from_manifest(tmp_path):
    import json

    import pandas as pd

    from brainfv.data.store import Dataset, write_manifest

    def dataset(root, values):
        root.mkdir()
        with VolumeWriter(root / "volumes.npy", len(values), (2, 2, 2)) as w:
            for v in values:
                w.append(np.full((2, 2, 2), v, np.float32))
        pd.DataFrame({"subject": ["a", "b"][:len(values)], "index": range(len(values))}).to_csv(
            root / "participants.tsv", sep="\t", index=False)
        return w.hash

    h = dataset(tmp_path / "a", [1.0, 2.0])
    with pytest.raises(InputDataError, match=r"manifest.json not found: .*write_manifest"):
        Dataset(tmp_path / "a").fingerprint()
    m = write_manifest(tmp_path / "a", h)
    assert m == json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["format"] == 1 and m["n_volumes"] == 2 and m["shape"] == [2, 2, 2] and m["dtype"] == "<f4"
    assert m["volumes_hash"] == h == _blake(np.full((2, 2, 2), 1.0, np.float32), np.full((2, 2, 2), 2.0, np.float32))
    dataset(tmp_path / "b", [1.0, 2.0])
    write_manifest(tmp_path / "b")  # hashes computed from the files: the same content, the same fingerprint
    fa, fb = Dataset(tmp_path / "a").fingerprint(), Dataset(tmp_path / "b").fingerprint()
    assert fa == fb and len(fa) == 64
    dataset(tmp_path / "c", [1.0, 2.5])
    write_manifest(tmp_path / "c")
    assert Dataset(tmp_path / "c").fingerprint() != fa
