import weakref

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainfv.attribution import (
    _rf_upsample,
    attribution_table,
    class_attribution_maps,
    default_cam_layer,
    write_attribution_nifti,
    write_attribution_table,
)
from brainfv.data.grid import Grid
from brainfv.errors import ConfigError, InputDataError
from brainfv.featviz.units import receptive_field
from brainfv.models import build_model

SHAPE = (16, 18, 16)
# class c's logit reads the conv output inside READ[c]; through the 3x3x3 conv it sees the input in FOOT[c]
READ = [(slice(3, 7), slice(4, 8), slice(3, 7)), (slice(9, 13), slice(9, 13), slice(9, 13))]
FOOT = [tuple(slice(s.start - 1, s.stop + 1) for s in r) for r in READ]


class TwoCubeModel(nn.Module):
    """logit c = weighted mean of softplus(conv(x)) over cube READ[c] (depends on the input in FOOT[c] only)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.conv.weight.data = 0.2 + 0.05 * torch.randn(self.conv.weight.shape, generator=g)
        self.conv.bias.data.zero_()
        self.act = nn.Softplus()
        self.readout = nn.Parameter(torch.tensor([1.0, 0.5, 0.8]))
        masks = torch.zeros((2,) + SHAPE)
        for c in range(2):
            masks[(c,) + READ[c]] = 1.0 / masks[(c,) + READ[c]].numel()
        self.register_buffer("masks", masks)

    def forward(self, x):
        a = self.act(self.conv(x))                                        # (B, 3, X, Y, Z)
        pooled = torch.einsum("bcxyz,kxyz->bkc", a, self.masks)           # (B, 2, 3)
        return pooled @ self.readout


def cube_volumes(labels, seed=0, swap=()):
    """Noise with a bright cube at FOOT[label] (at the other class's cube for indices in ``swap``)."""
    rng = np.random.default_rng(seed)
    vols = []
    for i, y in enumerate(labels):
        v = rng.normal(0, 1, SHAPE).astype(np.float32)
        v[FOOT[1 - y if i in swap else y]] += 3.0
        v[0:3] += 5.0  # strong signal elsewhere, which the model ignores
        vols.append(v)
    return vols


def fraction_inside(m, box):
    return float(np.abs(m[box]).sum() / np.abs(m).sum())


def test_ig_concentrates_in_the_region_the_logit_reads_in_class_order():
    labels = [0, 1, 1, 0, 1, 0]
    res = class_attribution_maps(TwoCubeModel(), cube_volumes(labels), labels, 2, n_steps=16, batch_size=4)
    assert sorted(res["maps"]) == [0, 1]
    for c in (0, 1):
        m = res["maps"][c]
        assert m.shape == SHAPE and m.dtype == np.float32
        assert res["maps_abs"][c].dtype == np.float32 and res["maps_all"][c].shape == SHAPE
        assert fraction_inside(m, FOOT[c]) > 0.9           # class c's map lies in class c's cube
        assert fraction_inside(m, FOOT[1 - c]) < 0.01
        assert m[FOOT[c]].mean() > 0                       # a bright cube is evidence *for* class c
        assert res["n_subjects"][c] == 3 and res["n_correct"][c] == 3 and res["n_used"][c] == 3
        assert res["delta"][c] < 1e-3                      # completeness: sum(attr) = logit(x) - logit(0)


def test_only_correctly_classified_subjects_are_averaged():
    labels = [0, 1, 1, 0, 1, 0]
    vols = cube_volumes(labels, swap=(2,))      # subject 2 (class 1) has class 0's cube: predicted 0, wrong
    model = TwoCubeModel()
    with torch.no_grad():
        pred = model(torch.as_tensor(np.stack(vols))[:, None]).argmax(1).numpy()
    assert pred.tolist() == [0, 1, 0, 0, 1, 0]
    res = class_attribution_maps(model, vols, labels, 2, n_steps=16, batch_size=4)
    assert res["n_subjects"] == {0: 3, 1: 3} and res["n_correct"] == {0: 3, 1: 2} and res["n_used"][1] == 2
    keep = [0, 1, 3, 4, 5]
    ref = class_attribution_maps(model, [vols[i] for i in keep], [labels[i] for i in keep], 2, n_steps=16)
    every = class_attribution_maps(model, vols, labels, 2, n_steps=16, only_correct=False)
    for c in (0, 1):
        np.testing.assert_allclose(res["maps"][c], ref["maps"][c], atol=1e-6)
        np.testing.assert_allclose(res["maps_all"][c], every["maps"][c], atol=1e-6)
    assert every["n_used"] == {0: 3, 1: 3}
    assert not np.allclose(res["maps"][1], res["maps_all"][1], atol=1e-4)


def test_deterministic_batch_invariant_and_caller_model_untouched():
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8]}).train()
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    vols = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(5)]
    labels = [0, 1, 0, 1, 1]
    a = class_attribution_maps(model, vols, labels, 2, n_steps=8, batch_size=2, only_correct=False)
    b = class_attribution_maps(model, vols, labels, 2, n_steps=8, batch_size=2, only_correct=False)
    c = class_attribution_maps(model, iter(vols), labels, 2, n_steps=8, batch_size=5, only_correct=False)
    for k in (0, 1):
        assert np.array_equal(a["maps"][k], b["maps"][k])
        np.testing.assert_allclose(a["maps"][k], c["maps"][k], rtol=1e-4, atol=1e-7)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


class CountingVolumes:
    """An indexable that records how many of the volumes it handed out are alive at once."""

    def __init__(self, vols):
        self.vols, self.live, self.max_live = vols, 0, 0

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        v = self.vols[i].copy()
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        weakref.finalize(v, self._dead)
        return v

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _dead(self):
        self.live -= 1


@pytest.mark.parametrize("method", ["gradcam", "saliency", "input_x_gradient"])
def test_other_methods_stream_and_keep_the_input_shape(method):
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8, 8]}).eval()
    rng = np.random.default_rng(2)
    vols = CountingVolumes([rng.normal(size=SHAPE).astype(np.float32) for _ in range(7)])
    labels = np.array([0, 1] * 3 + [0])
    res = class_attribution_maps(model, vols, labels, 2, method, batch_size=3, only_correct=False)
    assert vols.max_live <= 3
    for c in (0, 1):
        assert res["maps"][c].shape == SHAPE and res["maps"][c].dtype == np.float32
        assert np.isfinite(res["maps"][c]).all() and np.abs(res["maps"][c]).max() > 0
    assert res["layer"] == ("block3.norm" if method == "gradcam" else None)


def test_gradcam_on_braincnn_is_3d_and_aligned_to_the_receptive_field():
    torch.manual_seed(0)
    model = build_model({"channels": [4, 8, 8, 8]}).eval()
    assert default_cam_layer(model) == "block4.norm"
    shape = (24, 28, 20)
    vols = [np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(2)]
    res = class_attribution_maps(model, vols, [0, 1], 2, "gradcam", layer="block3.norm", only_correct=False)
    assert res["maps"][1].shape == shape and res["layer"] == "block3.norm"
    # the upsampling puts feature position p on its receptive-field centre p * stride - offset + (size - 1) / 2
    rf = receptive_field(model, "block3.norm", (1,) + shape)
    cam = torch.zeros(1, 1, 6, 7, 5, dtype=torch.float64)
    cam[0, 0, 2, 3, 1] = 1.0
    up = _rf_upsample(cam, rf, shape)[0, 0].numpy()
    assert up.shape == shape
    peak = np.array(np.unravel_index(up.argmax(), shape))
    centre = np.array([p * s - o + (n - 1) / 2 for p, (n, s, o) in zip((2, 3, 1), rf)])
    assert np.all(np.abs(peak - centre) <= 0.5)


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_positive_means_evidence_for_the_class(method):
    labels = [0, 1, 1, 0]
    vols = cube_volumes(labels)
    model = TwoCubeModel()
    res = class_attribution_maps(model, vols, labels, 2, method, n_steps=8, only_correct=False)
    with torch.no_grad():
        model.readout.neg_()  # the bright cube now lowers the logit: evidence against the class
    neg = class_attribution_maps(model, vols, labels, 2, method, n_steps=8, only_correct=False)
    for c in (0, 1):
        cube = res["maps"][c][FOOT[c]].mean()
        assert cube > 0 and cube > res["maps"][c].mean()
        np.testing.assert_allclose(neg["maps"][c], -res["maps"][c], rtol=1e-5, atol=1e-8)


def test_write_nifti_and_table(tmp_path):
    grid = Grid(shape=SHAPE, voxel_size=3.0, origin=(-20.0, -30.0, -20.0))
    labels = [0, 1, 1, 0]
    res = class_attribution_maps(TwoCubeModel(), cube_volumes(labels), labels, 2, n_steps=8)
    path = write_attribution_nifti(res["maps"], ["healthy", "lesion"], grid, tmp_path / "ig.nii.gz")
    img = nib.load(str(path))
    assert img.shape == SHAPE + (2,) and np.allclose(img.affine, grid.affine)
    assert img.get_data_dtype() == np.float32
    for c in (0, 1):
        np.testing.assert_array_equal(np.asarray(img.dataobj[..., c]), res["maps"][c])
    by_name = {"lesion": res["maps"][1], "healthy": res["maps"][0]}
    write_attribution_nifti(by_name, ["lesion", "healthy"], grid, tmp_path / "named.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "named.nii.gz")).dataobj[..., 0]),
                                  res["maps"][1])
    with pytest.raises(InputDataError, match="no attribution map for class 2"):
        write_attribution_nifti(res["maps"], ["a", "b", "c"], grid, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()
    write_attribution_table(res, tmp_path / "ig.tsv", ["healthy", "lesion"])
    t = pd.read_csv(tmp_path / "ig.tsv", sep="\t")
    assert t["class"].tolist() == ["healthy", "lesion"] and t["n_correct"].tolist() == [2, 2]
    assert set(t["method"]) == {"integrated_gradients"} and (t["seconds"] > 0).all()
    assert attribution_table(res).shape[0] == 2


def test_input_validation():
    vols = cube_volumes([0, 1])
    with pytest.raises(InputDataError, match="outside range"):
        class_attribution_maps(TwoCubeModel(), vols, [0, 2], 2)
    with pytest.raises(InputDataError, match="2 volumes but 3 labels"):
        class_attribution_maps(TwoCubeModel(), vols, [0, 1, 1], 2)
    with pytest.raises(Exception, match="method must be one of"):
        class_attribution_maps(TwoCubeModel(), vols, [0, 1], 2, "lrp")


def test_ig_baseline_number_or_array():
    labels = [0, 1]
    vols = cube_volumes(labels)
    num = class_attribution_maps(TwoCubeModel(), vols, labels, 2, n_steps=8, baseline=0.5)
    arr = class_attribution_maps(TwoCubeModel(), vols, labels, 2, n_steps=8, baseline=np.full(SHAPE, 0.5))
    zero = class_attribution_maps(TwoCubeModel(), vols, labels, 2, n_steps=8)
    np.testing.assert_allclose(num["maps"][1], arr["maps"][1], atol=1e-7)
    assert not np.allclose(num["maps"][1], zero["maps"][1], atol=1e-4)
    assert num["baseline"] == 0.5 and arr["baseline"] == "array" and num["delta"][1] < 1e-3
    with pytest.raises(ConfigError, match="expected the volume shape"):
        class_attribution_maps(TwoCubeModel(), vols, labels, 2, baseline=np.zeros((3, 3, 3)))
