import weakref

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainfv.data.grid import Grid
from brainfv.data.store import Dataset
from brainfv.errors import ConfigError, UnitError
from brainfv.featviz import objectives as O
from brainfv.featviz.exemplars import exemplar_table, exemplar_volumes, top_exemplars, write_exemplars
from brainfv.featviz.units import capture_activations
from brainfv.models import build_model

SHAPE = (20, 22, 18)
GRID = Grid(shape=SHAPE, voxel_size=3.0, origin=(-30.0, -33.0, -27.0))
# two 5x5x5 templates; unit c of the detector fires only where template c is present
TEMPLATES = np.stack([np.where(np.random.default_rng(s).random((5, 5, 5)) > 0.5, 1.0, -1.0) for s in (10, 11)])
PLANTED = {1: (0, (7, 12, 9)), 4: (1, (13, 5, 10))}  # volume row -> (template, centre voxel)


def detector():
    """conv (filters = templates, bias far below noise) -> relu -> maxpool: sparse, template-specific units."""
    conv = nn.Conv3d(1, 2, 5, padding=2)
    conv.weight.data = torch.as_tensor(TEMPLATES, dtype=torch.float32)[:, None]
    conv.bias.data[:] = -60.0  # a planted template gives 125 * 1.0; noise (std 0.2) gives ~N(0, 2.2)
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool3d(2)).eval()


def planted_volumes(n=7, seed=0):
    rng = np.random.default_rng(seed)
    vols = [rng.normal(0, 0.2, SHAPE).astype(np.float32) for _ in range(n)]
    for row, (t, c) in PLANTED.items():
        if row >= n:
            continue
        box = tuple(slice(p - 2, p + 3) for p in c)
        vols[row][box] += TEMPLATES[t]
    return vols


class CountingVolumes:
    """An indexable that records how many of the volumes it handed out are alive at once."""

    def __init__(self, vols):
        self.vols, self.live, self.max_live, self.reads = vols, 0, 0, 0

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        v = self.vols[i].copy()
        self.live += 1
        self.reads += 1
        self.max_live = max(self.max_live, self.live)
        weakref.finalize(v, self._dead)
        return v

    def _dead(self):
        self.live -= 1


@pytest.mark.parametrize("layer,tol", [("1", 0.0), ("2", 0.5)])  # relu (stride 1), maxpool (stride 2)
def test_planted_pattern_ranks_first_at_its_position(layer, tol):
    vols = planted_volumes()
    res = top_exemplars(detector(), vols, None, layer, [0, 1], k=3, batch_size=3)
    for unit, row in ((0, 1), (1, 4)):
        ui = res.unit_index(unit)
        assert res.rows[ui, 0] == row and res.scores[ui, 0] > 0
        assert np.all(res.scores[ui, 1:] == 0)              # the other volumes never reach the threshold
        centre = np.array(PLANTED[row][1])
        assert np.all(np.abs(res.centre[ui, 0] - centre) <= tol)
        assert np.all(np.abs(res.voxel[ui, 0] - centre) <= 1)
        box = res.slices(unit, 0)
        pattern = tuple(slice(p - 2, p + 3) for p in centre)
        assert all(b.start <= p.start and p.stop <= b.stop for b, p in zip(box, pattern))
        ex = exemplar_volumes(res, vols, unit)
        assert ex.shape == (3,) + SHAPE and ex.dtype == np.float32
        np.testing.assert_array_equal(ex[0][pattern], vols[row][pattern])   # the crop keeps the pattern
        outside = np.ones(SHAPE, bool)
        outside[box] = False
        assert np.all(ex[0][outside] == 0) and np.count_nonzero(ex[0]) == np.prod([b.stop - b.start for b in box])
        np.testing.assert_array_equal(exemplar_volumes(res, vols, f"{layer}:{unit}", crop=False)[0], vols[row])
    # rank order is row order among the tied (all-zero) volumes
    assert res.rows[0].tolist() == [1, 0, 2]


def per_volume_scores(model, vols, rows, layer, units, kind):
    """Objective values one volume at a time with brainfv.featviz.objectives (the reference)."""
    out = np.zeros((len(units), len(rows)))
    for j, r in enumerate(rows):
        x = torch.as_tensor(vols[r])[None, None]
        with torch.no_grad():
            acts = capture_activations(model, x, [layer])
        for ui, u in enumerate(units):
            obj = O.channel(layer, [u]) if kind == "channel" else O.neuron(layer, [u])
            out[ui, j] = float(obj(acts)[0])
    return out


@pytest.mark.parametrize("layer,kind", [("block2.norm", "channel"), ("block2.norm", "neuron"),
                                        ("classifier", "channel")])
def test_batched_pass_equals_per_volume_evaluation_on_braincnn(layer, kind):
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8, 8]})
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    rng = np.random.default_rng(3)
    vols = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(9)]
    rows = [8, 0, 3, 5, 6, 2, 7]
    units = [1, 0] if layer == "classifier" else [5, 0, 2]
    res = top_exemplars(model, vols, rows, layer, units, k=4, kind=kind, batch_size=3)
    one = top_exemplars(model, vols, rows, layer, units, k=4, kind=kind, batch_size=1)
    ref = per_volume_scores(model, vols, rows, layer, units, kind)
    for ui in range(len(units)):
        order = np.argsort(-ref[ui], kind="stable")[:4]
        assert res.rows[ui].tolist() == [rows[o] for o in order] == one.rows[ui].tolist()
        np.testing.assert_allclose(res.scores[ui], ref[ui, order], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.feature_pos, one.feature_pos)
    if layer == "classifier":
        assert res.feature_shape == () and res.slices(units[0], 0) is None
        assert np.all(res.feature_pos == -1) and np.isnan(res.centre).all()
        np.testing.assert_array_equal(exemplar_volumes(res, vols, units[0])[0], vols[res.rows[0, 0]])
    else:
        assert res.feature_shape == (10, 11, 9) and res.receptive_field == ((8, 2, 3),) * 3
        if kind == "neuron":
            assert np.all(res.feature_pos == np.array([5, 5, 4]))
        else:  # the position is the argmax of the unit's feature map in that volume
            ui, r = 0, res.rows[0, 0]
            with torch.no_grad():
                a = capture_activations(model, torch.as_tensor(vols[r])[None, None], [layer])[layer][0, units[ui]]
            assert tuple(res.feature_pos[ui, 0]) == np.unravel_index(int(a.argmax()), a.shape)
            p = res.feature_pos[ui, 0]
            np.testing.assert_allclose(res.centre[ui, 0], np.clip(p * 2 - 3 + 3.5, 0, np.array(SHAPE) - 1))


def test_memory_holds_one_batch_and_reads_only_the_exemplars(tmp_path):
    vols = CountingVolumes(planted_volumes(n=11))
    res = top_exemplars(detector(), vols, range(11), "1", [0, 1], k=2, batch_size=4)
    assert vols.reads == 11 and vols.max_live <= 4
    vols.reads = vols.max_live = 0
    write_exemplars(res, vols, GRID, tmp_path / "ex.nii.gz")
    assert vols.reads == 4 and vols.max_live <= 2     # units x k reads, k alive at most


def test_write_exemplars_nifti_and_table(tmp_path):
    vols = planted_volumes(n=5)
    participants = pd.DataFrame({"subject": ["s4", "s0", "s1"], "index": [4, 0, 1], "split": "test"})
    res = top_exemplars(detector(), vols, [0, 1, 4], "2", [1, 0], k=4)   # k > rows: a missing exemplar
    table = write_exemplars(res, vols, GRID, tmp_path / "ex.nii.gz", tmp_path / "ex.tsv",
                            participants=participants)
    img = nib.load(str(tmp_path / "ex.nii.gz"))
    assert img.shape == SHAPE + (8,) and np.allclose(img.affine, GRID.affine) and img.get_data_dtype() == np.float32
    assert int(img.header["sform_code"]) == 4
    data = np.asarray(img.dataobj)
    for ui, u in enumerate(res.units):                                    # volume = unit_index * k + rank
        ex = exemplar_volumes(res, vols, u)
        assert len(ex) == 3
        for rank in range(3):
            np.testing.assert_array_equal(data[..., ui * 4 + rank], ex[rank])
        assert np.all(data[..., ui * 4 + 3] == 0)
    t = pd.read_csv(tmp_path / "ex.tsv", sep="\t")
    assert len(t) == len(table) == 6
    top = t[(t["unit"] == 0) & (t["rank"] == 0)].iloc[0]
    assert top["row"] == 1 and top["subject"] == "s1" and top["volume"] == 4 and top["activation"] > 0
    np.testing.assert_allclose(top[["x_mm", "y_mm", "z_mm"]].to_numpy(float),
                               GRID.world_coords(res.centre[1, 0]))
    assert [top[f"box_{a}1"] - top[f"box_{a}0"] for a in "xyz"] == [6, 6, 6]
    assert {"feature_i", "voxel_x", "kind", "layer"} <= set(t.columns)


def test_works_on_a_volume_reader_with_participants(toy):
    ds = Dataset(toy)
    parts = ds.participants
    test = parts[parts["split"] == "test"]
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8]}).eval()
    res = top_exemplars(model, ds.volumes, test["index"], "block2.norm", [0, 3], k=2, batch_size=2)
    assert set(res.rows.ravel()) <= set(test["index"]) and res.n_rows == len(test)
    t = exemplar_table(res, parts, ds.grid, columns=("subject", "label"))
    assert t["subject"].tolist() == [parts.set_index("index").loc[r, "subject"] for r in t["row"]]
    assert len(exemplar_volumes(res, ds.volumes, 3)) == 2


def test_errors_and_caller_model_untouched():
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8]}).train()
    vols = planted_volumes(n=2)
    with pytest.raises(UnitError, match="out of range for layer 'block1.conv'"):
        top_exemplars(model, vols, None, "block1.conv", [4])
    with pytest.raises(UnitError, match="not in the model"):
        top_exemplars(model, vols, None, "block9", [0])
    with pytest.raises(ConfigError, match="kind"):
        top_exemplars(model, vols, None, "block1.conv", [0], kind="mean")
    res = top_exemplars(model, vols, None, "block1.conv", [0], k=1)
    with pytest.raises(UnitError, match="was not searched"):
        exemplar_volumes(res, vols, 2)
    assert model.training and all(p.requires_grad for p in model.parameters())
