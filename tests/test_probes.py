"""Probe positions chosen from the data and units' preferred classes (brainfv.featviz.probes)."""
import numpy as np
import pytest

from brainfv.data.grid import Grid
from brainfv.errors import ConfigError
from brainfv.featviz.probes import class_preference, position_mm, probe_position
from brainfv.models import build_model

SHAPE = (24, 28, 24)
GRID = Grid.from_bbox(4.0, [[-48, 48], [-56, 56], [-48, 48]])


def model():
    return build_model({"channels": [4, 8]}).eval()


def test_lesion_position_follows_the_planted_lesions_and_fits_the_grid():
    assert GRID.shape == SHAPE
    freq = np.zeros(SHAPE, np.float32)
    freq[16:20, 6:10, 14:18] = 1.0  # planted off-centre
    m = model()
    pos = probe_position(m, "block2.norm", SHAPE, GRID, "lesions", freq)
    centre = np.asarray(GRID.voxel_coords(position_mm(m, "block2.norm", SHAPE, GRID, pos)))
    assert np.all(np.abs(centre - np.array([17.5, 7.5, 15.5])) <= 2.5), centre
    assert probe_position(m, "block2.norm", SHAPE, GRID, "centre") is None
    # an MNI point: the position whose receptive-field centre is nearest to it
    xyz = GRID.world_coords([5, 20, 6])
    near = np.asarray(GRID.voxel_coords(position_mm(m, "block2.norm", SHAPE, GRID,
                                                    probe_position(m, "block2.norm", SHAPE, GRID, list(xyz)))))
    assert np.linalg.norm(near - np.array([5, 20, 6])) <= 3
    with pytest.raises(ConfigError, match="lesion frequency"):
        probe_position(m, "block2.norm", SHAPE, GRID, "lesions")
    with pytest.raises(ConfigError, match="sees a planted lesion"):
        probe_position(m, "block2.norm", SHAPE, GRID, "lesions", np.zeros(SHAPE))


def test_neuron_objective_reads_the_chosen_position():
    """The optimised region (receptive-field crop) of a neuron at the chosen position surrounds that position."""
    from brainfv.featviz.study import visualize_layer

    m = model()
    freq = np.zeros(SHAPE, np.float32)
    freq[16:20, 6:10, 14:18] = 1.0
    pos = probe_position(m, "block2.norm", SHAPE, GRID, "lesions", freq)
    real = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(2)]
    r = visualize_layer(m, "block2.norm", [0, 1], {}, shape=SHAPE, mask=np.ones(SHAPE, bool), real_volumes=real,
                        test_volumes=[], seed=0, task="t", regularizer="none", steps=2, n_seeds=1, objective="neuron",
                        position=pos)
    lo = np.array([s.start for s in r.region])
    hi = np.array([s.stop for s in r.region])
    assert np.all(lo <= [17, 7, 15]) and np.all(hi >= [18, 8, 16])
    assert (r.table["position"] == ",".join(map(str, pos))).all()


def test_class_preference():
    vals = np.array([[1.0, 0.0], [1.2, 0.1], [0.2, 1.0], [0.1, 1.1]])
    pref, d = class_preference(vals, ["absent", "absent", "present", "present"], ["absent", "present"])
    assert pref == ["absent", "present"] and d[0] < -3 and d[1] > 3
    pref, d = class_preference(vals[:2], ["absent", "absent"], ["absent", "present"])
    assert pref == ["", ""] and np.isnan(d).all()


def test_units_preferring_lesion_free_volumes_are_scored_for_no_lesion():
    from brainfv.report.compare import Truth

    t = Truth("lesion", "lesion", ["absent", "present"], np.ones((4, 4, 4), bool), 4.0,
              lesion_map=np.zeros((4, 4, 4), np.float32))
    assert t.lesion_sign(3, False, "absent") == -1 and t.lesion_sign(3, False, "present") == 1
    assert t.lesion_sign(3, False) == 1 and t.lesion_sign(0, True) == -1


def test_exemplars_of_a_neuron_read_its_probe_position():
    import torch

    from brainfv.featviz.exemplars import top_exemplars
    from brainfv.featviz.units import capture_activations

    m = model()
    rng = np.random.default_rng(0)
    vols = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(5)]
    pos = (4, 2, 3)
    res = top_exemplars(m, vols, None, "block2.norm", [0], k=2, kind="neuron", position=pos)
    with torch.no_grad():
        act = capture_activations(m, torch.as_tensor(np.stack(vols))[:, None], ["block2.norm"])["block2.norm"]
    expect = act[:, 0, pos[0], pos[1], pos[2]].numpy()
    assert np.allclose(res.scores[0], np.sort(expect)[::-1][:2], atol=1e-5)
    assert (res.feature_pos[0] == pos).all()
