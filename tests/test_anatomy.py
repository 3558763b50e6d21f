"""Volumes on anatomy: cut choice and the units × panels figure (nilearn on the MNI152 template)."""
import gc

import numpy as np
import pytest

from brainfv.data.grid import Grid
from brainfv.errors import InputDataError
from brainfv.report.anatomy import (
    IG_UNITS,
    PanelStyle,
    choose_cut_coords,
    panel_style,
    robust_max,
    units_on_anatomy_figure,
)

# A coarse grid in MNI space (8 mm: 20 x 24 x 20 voxels), so the template backdrop is real anatomy.
GRID = Grid.from_bbox(8.0, [[-80, 80], [-112, 80], [-72, 88]])


def _blob(grid, ijk, sigma_vox=1.2, amp=2.0):
    idx = np.indices(grid.shape).transpose(1, 2, 3, 0)
    d2 = ((idx - np.asarray(ijk)) ** 2).sum(-1)
    return (amp * np.exp(-d2 / (2 * sigma_vox ** 2))).astype(np.float32)


def _brain_mask(grid):
    """An ellipsoid 'brain' filling most of the grid (keeps the tests off the template resampling)."""
    idx = np.indices(grid.shape).transpose(1, 2, 3, 0).astype(float)
    c = (np.asarray(grid.shape) - 1) / 2
    return (((idx - c) / (np.asarray(grid.shape) * 0.45)) ** 2).sum(-1) <= 1


def test_choose_cut_coords_finds_the_planted_blob_not_the_loudest_volume():
    rng = np.random.default_rng(0)
    mask = _brain_mask(GRID)
    ijk = (6, 15, 12)
    focal = _blob(GRID, ijk) + 0.05 * rng.standard_normal(GRID.shape).astype(np.float32)
    noise = 1.5 * rng.standard_normal(GRID.shape).astype(np.float32)  # larger raw maximum, no structure
    assert np.abs(noise[mask]).max() > np.abs(focal[mask]).max()
    cut = choose_cut_coords({"none": noise, "tv": focal, "maco": None}, GRID, mask)
    expected = GRID.world_coords(ijk)
    assert np.all(np.abs(np.asarray(cut) - expected) <= GRID.voxel_size + 1e-6), (cut, expected)
    # the cut is a voxel centre of the grid, in mm
    assert np.allclose(GRID.voxel_coords(cut), np.round(GRID.voxel_coords(cut)))


def test_choose_cut_coords_edge_cases():
    mask = _brain_mask(GRID)
    centre = choose_cut_coords([None, np.zeros(GRID.shape, np.float32)], GRID, mask)
    assert np.allclose(GRID.voxel_coords(centre), np.round(GRID.voxel_coords(centre)))
    assert np.all(np.abs(np.asarray(centre)) < 40)  # near the middle of MNI space
    with pytest.raises(InputDataError, match="not on the grid"):
        choose_cut_coords([np.zeros((4, 4, 4))], GRID, mask)
    with pytest.raises(InputDataError, match="brain mask"):
        choose_cut_coords([np.zeros(GRID.shape)], GRID, np.ones((3, 3, 3), bool))


def test_panel_styles_and_robust_max():
    assert panel_style("tv").kind == "overlay" and panel_style("tv").scale == "column"
    assert panel_style("exemplar").kind == "image"
    assert panel_style("attribution: AD").units == IG_UNITS
    custom = PanelStyle(scale="panel", units="x")
    assert panel_style("tv", {"tv": custom}) is custom
    with pytest.raises(ValueError, match="kind"):
        PanelStyle(kind="surface")
    v = np.arange(1000, dtype=np.float32) - 500
    assert robust_max(v) == pytest.approx(np.percentile(np.abs(v), 99.5))


def test_units_on_anatomy_figure_rows_share_one_cut(tmp_path):
    import matplotlib
    from PIL import Image

    rng = np.random.default_rng(1)
    mask = _brain_mask(GRID)
    where = [(6, 15, 12), (13, 8, 9), (10, 12, 15)]
    def vis(i, s):
        return (s * _blob(GRID, where[i]) + 0.2 * rng.standard_normal(GRID.shape)).astype(np.float32)
    panels = {
        "none": [vis(i, 1.0) for i in range(3)],
        "tv": [vis(i, -0.5) for i in range(3)],
        "exemplar": [None, 0.8 * rng.standard_normal(GRID.shape).astype(np.float32) * mask, None],
        "attribution": [1e-3 * vis(i, 1.0) for i in range(3)],
    }
    given = (8.0, -24.0, 16.0)
    rc_before = dict(matplotlib.rcParams)
    out = units_on_anatomy_figure(panels, ["b4:0", "b4:1", "b4:2"], GRID, tmp_path / "fig.png",
                                  "test figure", cut_coords=[None, given, None], mask=mask)
    assert out.path == tmp_path / "fig.png" and (tmp_path / "fig.png").exists()
    assert 0 < out.n_bytes < 2_000_000
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size == out.size_px
        colours = len(im.convert("RGB").getcolors(1 << 16) or [])
    assert colours > 50  # anatomy and overlays, not a blank canvas
    assert out.cut_coords[1] == given
    for i, row in enumerate(out.panel_cut_coords):
        for j, cut in enumerate(row):
            if panels[list(panels)[j]][i] is None:
                assert cut is None
            else:
                assert cut == pytest.approx(out.cut_coords[i])  # every panel of a row: one MNI cut
    # the chosen cuts land on the planted blobs (rows 0 and 2)
    for i in (0, 2):
        assert np.all(np.abs(np.asarray(out.cut_coords[i]) - GRID.world_coords(where[i])) <= GRID.voxel_size)
    assert isinstance(out.vmax["attribution"], list)  # scaled per panel
    assert out.vmax["none"] > out.vmax["tv"] > 0  # one scale per column, in data units
    assert dict(matplotlib.rcParams) == rc_before  # no global style left behind
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # nothing left open in pyplot
    assert gc.get_freeze_count() == 0  # the collector's frozen generation is given back


def test_units_on_anatomy_figure_validates(tmp_path):
    mask = _brain_mask(GRID)
    with pytest.raises(InputDataError, match="expected one per unit"):
        units_on_anatomy_figure({"tv": [np.zeros(GRID.shape)]}, ["a", "b"], GRID, tmp_path / "x.png", "t",
                                mask=mask)
    with pytest.raises(InputDataError, match="grid"):
        units_on_anatomy_figure({"tv": [np.zeros((3, 3, 3))]}, ["a"], GRID, tmp_path / "x.png", "t", mask=mask)
    assert not (tmp_path / "x.png").exists()
