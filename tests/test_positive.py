"""Positive-control networks: the study's architecture with a known preferred input, recovered on a tiny grid."""
import nibabel as nib
import numpy as np
import pytest
import torch

from brainfv.errors import ConfigError
from brainfv.featviz.render import render
from brainfv.featviz.study import make_objective
from brainfv.models.positive import (
    known_pattern,
    lesion_positions,
    lesion_template_kernel,
    positive_control_network,
    sex_cell_weights,
    sex_control_network,
    sex_known_pattern,
)

SHAPE = (32, 32, 32)
ARCH = {"channels": [2, 2], "dropout": 0.0}


def ball(centre, d=4.0, depth=-2.0):
    g = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    x = np.zeros(SHAPE, np.float32)
    x[np.linalg.norm(g - np.asarray(centre), axis=-1) <= d / 2] = depth
    return x


def logit(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)[None, None]).numpy()[0]


def test_template_kernel_is_balanced_and_dark_centred():
    k = lesion_template_kernel(5)
    assert abs(k.sum()) < 1e-6 and abs(np.linalg.norm(k) - 1) < 1e-5
    c = k.shape[0] // 2
    assert k[c, c, c] < 0 and k[0, 0, 0] == 0


def test_lesion_positions_follow_the_planted_frequency():
    f = np.zeros(SHAPE)
    f[20:24, 4:8, 8:12] = 1.0  # cell (5, 1, 2) of 4-voxel cells
    f[0:4, 0:4, 0:4] = 0.3
    assert lesion_positions(f, 2, k=2) == [(5, 1, 2), (0, 0, 0)]


@pytest.mark.parametrize("hidden", [0, 6])
def test_positive_control_prefers_dark_lesions_where_built_to(hidden):
    pos = [(5, 1, 2)]
    flat = positive_control_network({**ARCH, "head": "flatten", "hidden": hidden}, SHAPE, 4.0, pos)
    pool = positive_control_network({**ARCH, "head": "pool", "hidden": hidden}, SHAPE, 4.0)
    inside, outside = ball((21.5, 5.5, 9.5)), ball((9.5, 21.5, 21.5))
    blank = np.zeros(SHAPE, np.float32)
    # flatten head: a dark lesion counts only inside the read cell; pooled head: anywhere alike
    assert logit(flat, inside)[1] > logit(flat, blank)[1] + 0.1
    assert abs(logit(flat, outside)[1] - logit(flat, blank)[1]) < 1e-6
    assert logit(pool, inside)[1] > logit(pool, blank)[1] + 0.01
    assert np.isclose(logit(pool, inside)[1], logit(pool, outside)[1], rtol=1e-4)
    # a dark ball is preferred to a bright one (whose rim alone matches the template's shell); 'absent' is constant
    assert logit(flat, inside)[1] > 1.5 * logit(flat, -inside)[1]
    assert logit(flat, inside)[0] == logit(flat, blank)[0]
    with pytest.raises(ConfigError, match="positions"):
        positive_control_network({**ARCH, "head": "flatten"}, SHAPE, 4.0)


def test_positive_control_pattern_recovered_by_activation_maximization():
    """Optimising the 'present' logit of the flatten-head control on a bounded image puts its darkest,
    lesion-like blob inside the read cell (the known where)."""
    pos = [(5, 1, 2)]
    net = positive_control_network({**ARCH, "head": "flatten"}, SHAPE, 4.0, pos)
    res = render(net, make_objective("classifier", [1], "channel"), SHAPE,
                 {"range": "tanh", "bound": 2.0, "mask": False}, steps=48, lr=0.1, seeds=[0])
    img = res.images[0]
    region = known_pattern(SHAPE, 4.0, pos, n_blocks=2).astype(bool)
    k = lesion_template_kernel(4.0)
    from scipy.ndimage import correlate
    resp = correlate(img, k, mode="constant")
    best = np.unravel_index(np.argmax(resp), SHAPE)
    assert region[best], (best, np.argwhere(region).min(0), np.argwhere(region).max(0))
    # beyond the read cell's receptive field (the cell grown by the kernels' reach) the image stays unstructured
    from scipy.ndimage import binary_dilation
    far = ~binary_dilation(region, iterations=6)
    assert resp[region].max() > 5 * max(resp[far].max(), 1e-6)


# --- the sex task's control (flatten head): 'M' prefers the regional sex effect at the last maps' cells ---

def sex_effect(shape=SHAPE):
    """Two Gaussian blobs: brighter in males at one place, in females at another."""
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    blob = lambda c: np.exp(-((g - np.asarray(c)) ** 2).sum(-1) / (2 * 3.0 ** 2))  # noqa: E731
    return (0.3 * blob((6, 6, 9)) - 0.2 * blob((11, 12, 5))).astype(np.float32)


def test_sex_cell_weights_average_the_effect_per_cell():
    e = np.zeros((18, 17, 16), np.float32)
    e[4:8, 0:4, 0:4] = 2.0       # cell (1, 0, 0) of 4-voxel cells
    e[16:, :, :] = 9.0           # past the last whole cell (4 cells of 4 voxels): never read
    w = sex_cell_weights(e, 2)
    assert w.shape == (4, 4, 4) and np.isclose(np.abs(w).sum(), 1.0)
    assert w[1, 0, 0] == 1.0 and np.count_nonzero(w) == 1
    known = sex_known_pattern(e.shape, w, 2)
    assert known[4:8, 0:4, 0:4].min() == 1.0 and known.sum() == 64 and known[16:].max() == 0
    with pytest.raises(ConfigError, match="zero on every cell"):
        sex_cell_weights(np.zeros((8, 8, 8)), 2)


@pytest.mark.parametrize("arch", [{"channels": [2, 3], "hidden": 0, "norm": "batch", "activation": "relu"},
                                  {"channels": [2, 3], "hidden": 1, "norm": "none", "activation": "elu"},
                                  {"channels": [3, 2], "hidden": 6, "norm": "batch", "activation": "gelu",
                                   "kernel_size": 5}])
def test_sex_control_is_the_study_network_with_a_known_concave_logit(arch, tmp_path):
    """The built network has build_model's architecture (it saves and loads as a study checkpoint), and its 'M'
    logit is sum_{w>0} w min_cell(x) + sum_{w<0} w max_cell(x) up to a constant ('F': the same with -w)."""
    from brainfv.models.cnn import build_model, load_checkpoint, save_checkpoint

    a = {**arch, "head": "flatten", "dropout": 0.0}
    shape = (9, 13, 8)  # cells (2, 3, 2) of 4 voxels; the trailing voxels are never read
    w = sex_cell_weights(np.random.default_rng(0).normal(size=shape), 2)
    net = sex_control_network(a, shape, w, male=1)
    ref = build_model(a, 2, shape)
    assert net.arch == ref.arch
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    save_checkpoint(tmp_path / "m.pt", net)
    net, _ = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(3, 1, *shape)
    cells = x[:, 0, :8, :12, :8].reshape(3, 2, 4, 3, 4, 2, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 2, 3, 2, -1)
    lo, hi = cells.min(-1).values.numpy(), cells.max(-1).values.numpy()
    wt = w[None]
    m_expect = (np.where(wt > 0, wt * lo, 0) + np.where(wt < 0, wt * hi, 0)).sum((1, 2, 3))
    f_expect = (np.where(wt < 0, -wt * lo, 0) + np.where(wt > 0, -wt * hi, 0)).sum((1, 2, 3))
    with torch.no_grad():
        out = (net(x) - net(torch.zeros(1, 1, *shape))).numpy()
    assert np.allclose(out[:, 1], m_expect, atol=1e-4)
    if a["hidden"] != 1:  # one hidden unit carries 'M' only: 'F' is constant
        assert np.allclose(out[:, 0], f_expect, atol=1e-4)
    else:
        assert np.allclose(out[:, 0], 0.0)


def test_sex_control_needs_a_flatten_head_and_two_channels():
    w = sex_cell_weights(sex_effect(), 2)
    with pytest.raises(ConfigError, match="flatten"):
        sex_control_network({**ARCH, "head": "pool"}, SHAPE, w)
    with pytest.raises(ConfigError, match="2 channels"):
        sex_control_network({"channels": [1, 2], "head": "flatten"}, SHAPE, w)


@pytest.mark.parametrize("unit,sign", [(1, 1.0), (0, -1.0)])
def test_sex_control_pattern_recovered_by_activation_maximization(unit, sign):
    """Optimising the 'M' logit on a bounded image recovers the known pattern (the sign of the effect's cell
    means at the range's bounds); the 'F' logit its negative. Its correlation with the effect is the optimum's."""
    shape = (16, 16, 16)
    effect = sex_effect(shape)
    w = sex_cell_weights(effect, 2)
    net = sex_control_network({**ARCH, "head": "flatten", "hidden": 4}, shape, w, male=1)
    res = render(net, make_objective("classifier", [unit], "channel"), shape,
                 {"range": "tanh", "bound": 2.0, "mask": False}, steps=96, lr=0.1, seeds=[0],
                 converge={"enabled": False}, amp=False)  # as the study runs it: bf16 rounds away x + SEX_OFFSET's x
    img = res.images[0]
    known = sex_known_pattern(shape, w, 2)
    read = known != 0
    assert np.corrcoef(sign * img[read], known[read])[0, 1] > 0.9
    ceiling = np.corrcoef(known.ravel(), effect.ravel())[0, 1]
    assert np.corrcoef(sign * img.ravel(), effect.ravel())[0, 1] > 0.8 * ceiling > 0.2


def test_construct_sex_control_from_a_dataset_folder(toy, tmp_path):
    """construct_positive_control on a cohort folder: the sex control from its regional effect map, as a study
    checkpoint whose 'M' logit prefers the bright cells; the errors name the config key."""
    import json

    import pandas as pd

    from brainfv.data.store import Dataset
    from brainfv.models.cnn import load_checkpoint
    from brainfv.models.positive import construct_positive_control

    parts = pd.read_csv(toy / "participants.tsv", sep="\t")
    parts["sex"] = parts["sex"].map({"A": "F", "B": "M"})
    parts.to_csv(toy / "participants.tsv", sep="\t", index=False)
    effect = np.zeros((12, 14, 12), np.float32)
    effect[4:8, 4:8, 4:8] = 1.0  # brighter in males: cell (1, 1, 1) of 4-voxel cells
    Dataset(toy).grid.to_nifti(effect).to_filename(toy / "sex_effect_regional.nii.gz")
    arch = {"channels": [2, 2], "head": "flatten", "hidden": 4}
    meta = construct_positive_control(toy, arch, "sex-known-flatten", "sex", tmp_path / "m")
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == meta
    assert meta["classes"] == ["F", "M"] and meta["construction"]["cells_read"] == 1
    assert meta["construction"]["effect_corr_of_optimum"] > 0.9
    net, m2 = load_checkpoint(tmp_path / "m" / "model.pt")
    assert m2["role"] == "positive control" and net.arch["head"] == "flatten" and m2["precision"] == "fp32"
    bright = np.zeros((1, 1, 12, 14, 12), np.float32)
    bright[..., 4:8, 4:8, 4:8] = 1.0
    with torch.no_grad():
        gain = net(torch.as_tensor(bright)) - net(torch.zeros_like(torch.as_tensor(bright)))
    assert gain[0, 1] > 0.9 and gain[0, 0] < -0.9
    known = np.moveaxis(np.asarray(nib.load(tmp_path / "m" / "known.nii.gz").dataobj), -1, 0)
    assert known.shape == (2, 12, 14, 12) and np.isfinite(known).sum() == 2 * 4 ** 3  # the one read cell
    assert (known[1, 4:8, 4:8, 4:8] == 1).all() and (known[0, 4:8, 4:8, 4:8] == -1).all()
    with pytest.raises(ConfigError, match=r"tasks\.sex-known\.positive_control"):
        construct_positive_control(toy, {**arch, "head": "pool"}, "sex-known", "sex", tmp_path / "p")
    with pytest.raises(ConfigError, match=r"tasks\.odd\.positive_control: no positive control .* 'label'"):
        construct_positive_control(toy, arch, "odd", "label", tmp_path / "o")


def test_config_names_the_key_of_a_control_that_cannot_be_built():
    from brainfv.config import check, complete

    ok = {"sex-known-flatten": {"dataset": "cohort", "target": "sex", "positive_control": True,
                                "arch": {"head": "flatten", "hidden": 4}}}
    check(complete({"tasks": ok}))
    for spec, says in (({"dataset": "cohort", "target": "sex", "positive_control": True}, "flatten head"),
                       ({"dataset": "cohort", "target": "lesion", "positive_control": True}, "dataset: lesions"),
                       ({"dataset": "cohort", "target": "handedness", "positive_control": True}, "'handedness'")):
        with pytest.raises(ConfigError, match=rf"tasks\.x\.positive_control: .*{says}"):
            check(complete({"tasks": {"x": spec}}))


def test_other_model_control_of_the_positive_controls_is_chosen_by_head():
    """The comparison's other-model control: a known network is paired with a trained network of the other task
    and the same head (config order), and adding the sex control changes no pairing of the others."""
    from brainfv.report.compare import Truth, other_tasks

    m = np.ones((2, 2, 2), bool)
    lesion = lambda t: Truth(t, "lesion", ["absent", "present"], m, 8.0, lesion_map=np.zeros((2, 2, 2)))  # noqa: E731
    sex = lambda t: Truth(t, "sex", ["F", "M"], m, 8.0, effect=np.zeros((2, 2, 2)))  # noqa: E731
    heads = {"sex": "pool", "lesion": "pool", "sex-flatten": "flatten", "lesion-flatten": "flatten",
             "lesion-known": "pool", "lesion-known-flatten": "flatten", "sex-known-flatten": "flatten"}
    truths = {t: (sex if t.startswith("sex") else lesion)(t) for t in heads}
    first = {t: other_tasks(t, truths, heads)[0] for t in heads}
    assert first == {"sex": "lesion", "lesion": "sex", "sex-flatten": "lesion-flatten",
                     "lesion-flatten": "sex-flatten", "lesion-known": "sex", "lesion-known-flatten": "sex-flatten",
                     "sex-known-flatten": "lesion-flatten"}


def test_sex_control_optimum_is_undefined_in_cells_that_leave_the_brain_mask():
    """A masked image is 0 outside the brain: in a cell that holds such voxels the 0s cap a bright cell's
    minimum, so its optimum is not one image; only cells wholly inside the mask keep a known optimum."""
    from brainfv.models.positive import _cells_inside

    mask = np.zeros((8, 8, 8), bool)
    mask[:4, :4, :4] = True
    mask[4:, 4:, 4:] = True
    mask[7, 7, 7] = False
    inside = _cells_inside(mask, 2)   # cells of 4 voxels
    assert inside[:4, :4, :4].all() and not inside[4:, 4:, 4:].any() and inside.sum() == 64


@pytest.mark.parametrize("d", [4.0, 5.02, 5.2, 6.0])
def test_template_kernel_is_the_smallest_that_holds_the_template(d):
    """A kernel two voxels wider only adds an all-zero border (the same function at more cost); the kernel's own
    border is not all zero."""
    k = lesion_template_kernel(d)
    wider = lesion_template_kernel(d, size=k.shape[0] + 2)
    inner = wider[1:-1, 1:-1, 1:-1]
    assert np.allclose(inner, k, atol=1e-6)
    assert np.abs(wider).sum() - np.abs(inner).sum() < 1e-5
    assert np.abs(k).sum() - np.abs(k[1:-1, 1:-1, 1:-1]).sum() > 1e-3


def test_positive_controls_are_visualised_in_fp32_unless_asked():
    from brainfv.device import autocast_default, native_bf16
    from brainfv.jobs.featviz import request_precision

    said = []
    control = {"meta": {"role": "positive control", "precision": "fp32"}}
    assert request_precision({"amp": None}, control, said.append) is False and "fp32" in said[0]
    assert request_precision({"amp": True}, control, said.append) is True  # asked for
    assert request_precision({"amp": None}, {"meta": {"role": "main"}}, said.append) is None  # the default
    assert autocast_default("cuda") and autocast_default("cpu") == native_bf16()
    assert isinstance(native_bf16(), bool)
