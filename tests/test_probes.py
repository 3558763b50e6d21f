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


def _rf(m, layer=("block2.norm")):
    from brainfv.featviz.probes import _field

    rf, _ = _field(m, layer, SHAPE)
    return np.array([r[0] for r in rf]), np.array([r[1] for r in rf]), np.array([r[2] for r in rf])


def test_several_positions_are_the_most_lesion_rich_separated_and_inside_the_grid():
    from brainfv.featviz.probes import probe_positions

    m = model()
    size, stride, offset = _rf(m)
    freq = np.zeros(SHAPE, np.float32)
    blobs = [((16, 6, 14), 1.0), ((6, 18, 8), 0.7), ((14, 20, 6), 0.4)]  # three planted sites, decreasing share
    for (x, y, z), share in blobs:
        freq[x:x + 4, y:y + 4, z:z + 4] = share
    freq[17, 7, 15] = 1.0  # a peak beside the first site: its neighbours must not be chosen a second time
    pos = probe_positions(m, "block2.norm", SHAPE, GRID, "lesions", freq, k=3)
    assert len(set(pos)) == 3 and pos[0] == probe_position(m, "block2.norm", SHAPE, GRID, "lesions", freq)
    lo = np.array(pos) * stride - offset
    assert (lo >= 0).all() and (lo + size <= SHAPE).all()  # every receptive field inside the grid
    centres = lo + (size - 1) / 2
    for a in range(3):
        for b in range(a + 1, 3):  # at least half a receptive field apart along some axis
            assert (np.abs(centres[a] - centres[b]) >= size / 2).any(), (pos[a], pos[b])
    # ordered by lesion share: each site's probe, most planted first
    sites = np.array([[x + 1.5, y + 1.5, z + 1.5] for (x, y, z), _ in blobs])
    assert [int(np.argmin(np.linalg.norm(sites - c, axis=1))) for c in centres] == [0, 1, 2]
    share = [freq[tuple(slice(int(a), int(a) + 4) for a in np.rint(c - 1.5))].mean() for c in centres]
    assert share == sorted(share, reverse=True)
    # fewer separated lesion-rich positions than asked: the key and how many fit
    with pytest.raises(ConfigError, match=r"featviz.layers\[b2\].positions.*asks for 40 positions, but only \d+"):
        probe_positions(m, "block2.norm", SHAPE, GRID, "lesions", freq, k=40, key="featviz.layers[b2].positions")
    for where in ("centre", [0.0, -20.0, 10.0]):
        with pytest.raises(ConfigError, match="2 positions need position: lesions"):
            probe_positions(m, "block2.norm", SHAPE, GRID, where, freq, k=2)
    assert probe_positions(m, "block2.norm", SHAPE, GRID, "centre", k=1) == [None]


def _job(tmp_path, positions, shape=(16, 18, 16)):
    """The visualize job of a neuron request at ``position: lesions`` on a toy dataset with two planted sites."""
    import torch
    from conftest import toy_dataset

    from brainfv.data.grid import Grid
    from brainfv.jobs.base import Job
    from brainfv.jobs.featviz import visualize_job
    from brainfv.models import save_checkpoint

    ds = toy_dataset(tmp_path / "toy", n=12, shape=shape)
    torch.manual_seed(0)
    ck = tmp_path / "model.pt"
    net = build_model({"channels": [4, 8]}).eval()
    save_checkpoint(ck, net, classes=["A", "B"], task="toy", target="label")
    grid = Grid(shape=shape, voxel_size=8.0, origin=(-40.0, -50.0, -40.0))
    freq = np.zeros(shape, np.float32)
    freq[4:8, 5:9, 4:8] = 1.0
    freq[9:13, 10:15, 8:12] = 0.6
    grid.to_nifti(freq).to_filename(tmp_path / "freq.nii.gz")
    out = {k: str(tmp_path / f) for k, f in (("nifti", "units.nii.gz"), ("randomized", "randomized.nii.gz"),
                                             ("table", "units.tsv"), ("trajectory", "trajectory.tsv"))}
    request = {"only_unit": None, "task": "toy", "layer": "block2.norm", "module": "block2.norm", "regularizer": "v",
               "units": [0, 3], "objective": "neuron", "preset": {"jitter": 1}, "steps": 4, "lr": 0.1,
               "n_seeds": 2, "n_real": 4, "micro_batch": None, "device": "cpu", "seed": 1, "randomized": True,
               "position": "lesions", "positions": positions}
    inputs = {"model": str(ck), "position_map": str(tmp_path / "freq.nii.gz"),
              **{k: str(ds / f) for k, f in (("participants", "participants.tsv"), ("volumes", "volumes.npy"),
                                             ("mask", "mask.nii.gz"), ("reference", "reference.nii.gz"))}}
    logs = []
    visualize_job(Job(input=inputs, output=out, params={"request": request, "model": None, "model_key": "m"},
                      log=logs.append, rule="visualize"))
    return out, net, grid, freq, logs


def test_a_request_at_two_positions_optimises_every_unit_at_each_in_its_own_crop(tmp_path):
    import nibabel as nib
    import pandas as pd

    from brainfv.featviz.probes import _field, probe_positions
    from brainfv.featviz.study import parse_region

    out, net, grid, freq, logs = _job(tmp_path, 2)
    want = probe_positions(net, "block2.norm", grid.shape, grid, "lesions", freq, k=2)
    t = pd.read_csv(out["table"], sep="\t", dtype={"position": str})
    imgs = np.moveaxis(np.asarray(nib.load(out["nifti"]).dataobj, np.float32), -1, 0)
    assert imgs.shape[0] == 2 * 2 * 2  # positions x units x seeds
    assert np.asarray(nib.load(out["randomized"]).dataobj).shape == imgs.shape[1:] + (8,)
    for name, d in t.groupby("network"):
        assert sorted(d["volume"]) == list(range(8)) and d.groupby(["unit", "seed"]).size().eq(1).all()
        assert (d["position_index"] == d["seed"] // 2).all()  # position i's seeds are i * n_seeds + s
    tt = t[t["network"] == "trained"]
    rand = t[t["network"] == "randomized"].set_index(["unit", "seed"])
    rf, _ = _field(net, "block2.norm", grid.shape)
    size, stride, offset = (np.array([r[i] for r in rf]) for i in range(3))
    for r in tt.itertuples():
        pos = want[r.position_index]
        assert r.position == ",".join(map(str, pos))
        assert rand.loc[(r.unit, r.seed), "seed_value"] == r.seed_value  # the control: the same start, same place
        region = parse_region(r.region)
        lo = np.array(pos) * stride - offset
        assert all(s.start <= a and a + n <= s.stop for s, a, n in zip(region, lo, size))  # its receptive field
        inside = np.zeros(grid.shape, bool)
        inside[region] = True
        img = imgs[r.volume]
        assert np.abs(img[inside]).max() > 0 and not img[~inside].any()  # nonzero only inside its own crop
    assert tt.groupby("position_index")["region"].nunique().eq(1).all() and tt["region"].nunique() == 2
    assert len(set(tt["seed_value"])) == len(tt)  # every visualization its own start
    assert sum(m.startswith("probe position") for m in logs) == 2  # each logged with its MNI centre


def test_one_position_is_the_single_position_study():
    """positions: 1 runs exactly what one visualize_layer call at the probe position ran before (volumes and
    table; the table only gains position_index)."""
    from brainfv.featviz.study import join_positions, visualize_layer, visualize_positions

    m = model()
    freq = np.zeros(SHAPE, np.float32)
    freq[16:20, 6:10, 14:18] = 1.0
    pos = probe_position(m, "block2.norm", SHAPE, GRID, "lesions", freq)
    real = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(3)]
    kw = dict(shape=SHAPE, mask=np.ones(SHAPE, bool), real_volumes=real, test_volumes=real[:2], task="t",
              regularizer="none", steps=3, n_seeds=2, objective="neuron")
    before = visualize_layer(m, "block2.norm", [0, 1], {}, seed=5, position=pos, **kw)
    imgs, table = join_positions(visualize_positions(m, "block2.norm", [0, 1], {}, positions=[pos], seed=5, **kw))
    assert np.array_equal(imgs, before.images)
    assert (table["position_index"] == 0).all()
    timing = ["seconds", "steps_per_s"]
    assert table.drop(columns=["position_index"] + timing).equals(before.table.drop(columns=timing))
