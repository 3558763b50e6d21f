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
