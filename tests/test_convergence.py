"""A fair optimisation: bounded images, a plateau criterion, normalised objectives, cascading controls and
the same start image for every network (issue 18, part A)."""
import copy
import importlib

import numpy as np
import pytest
import torch
from conftest import small_model
from torch import nn

from brainfv.config import Preset
from brainfv.featviz import objectives as O
from brainfv.featviz import render
from brainfv.featviz.controls import cascade, cascade_stages, randomized_copy
from brainfv.featviz.param import FourierParam, MacoParam, VoxelParam, data_range
from brainfv.featviz.render import Converge
from brainfv.featviz.study import visualize_layer
from brainfv.models import build_model

SHAPE = (12, 16, 12)
LO, HI = -2.5, 3.5


def real_volumes(n=4, shape=SHAPE):
    return [np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(n)]


def linear_unit(sign=1.0):
    """One 3x3x3 convolution with positive weights: its channel mean is linear in the image, maximal at the
    image that is ``hi`` everywhere (``lo`` for ``sign=-1``)."""
    conv = nn.Conv3d(1, 1, 3, bias=False)
    conv.weight.data[:] = sign * (0.5 + torch.rand(1, 1, 3, 3, 3, generator=torch.Generator().manual_seed(0)))
    return nn.Sequential(conv).eval()


@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("kind", ["voxel", "fourier", "maco"])
def test_bounded_parametrisations_never_leave_the_range(kind, project):
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    mag = torch.fft.rfftn(torch.randn(SHAPE)).abs() * 50  # an amplitude far beyond the range
    make = {"voxel": lambda: VoxelParam(SHAPE, gens, data=(LO, HI), project=project),
            "fourier": lambda: FourierParam(SHAPE, gens, data=(LO, HI), project=project),
            "maco": lambda: MacoParam(SHAPE, gens, mag, data=(LO, HI))}[kind]
    p = make()
    for scale in (1.0, 1e3, 1e8):  # random, then adversarially large variables
        with torch.no_grad():
            for v in p.parameters():
                v.copy_(torch.randn(v.shape, generator=gens[0]) * scale)
        if hasattr(p, "project_"):
            p.project_()  # what the loop does after every step
        x = p()
        assert torch.isfinite(x).all() and x.min() >= LO and x.max() <= HI
        # projected: the variables themselves hold an image inside the range (up to FFT rounding)
        if project and kind != "maco":
            raw = p.x if kind == "voxel" else torch.fft.irfftn(torch.view_as_complex(p.spectrum) * p.scale,
                                                                 s=SHAPE, dim=(-3, -2, -1))
            assert raw.min() >= LO - 1e-3 * (HI - LO) and raw.max() <= HI + 1e-3 * (HI - LO)
    # and unbounded when asked for (experiments)
    p = {"voxel": VoxelParam, "fourier": FourierParam}.get(kind)
    if p is not None:
        q = p(SHAPE, gens, value_range="none")
        with torch.no_grad():
            next(q.parameters()).mul_(1e4)
        assert q().abs().max() > HI


def test_optimised_images_stay_in_the_data_range():
    vols = real_volumes()
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    lo, hi = data_range(vols, mask, 0.5)
    vals = np.concatenate([v[mask] for v in vols])
    assert np.isclose(lo, np.percentile(vals, 0.5)) and np.isclose(hi, np.percentile(vals, 99.5))
    for preset in ({}, {"param": "fourier", "decay": 1.0}, {"param": "maco"}):
        res = render(linear_unit(), O.channel("0", [0, 0]), SHAPE, preset, steps=40, lr=0.5, seeds=[0, 1], mask=mask,
                     real_volumes=vols)
        assert res.info["data_range"] == (lo, hi)
        assert res.images.min() >= lo and res.images.max() <= hi and res.images.std() > 0.1


def test_linear_unit_converges_to_the_bound_and_an_unbounded_one_is_flagged():
    conv = dict(rtol=0.01, every=8, min_steps=16)
    res = render(linear_unit(), O.channel("0", [0, 0]), SHAPE, {}, steps=400, lr=0.1, seeds=[0, 1],
                 data_range=(LO, HI), converge=conv)
    assert res.info["converged"].all() and (res.info["steps_run"] < 400).all()
    inner = res.images[:, 2:-2, 2:-2, 2:-2]
    assert inner.min() > HI - 0.05 * (HI - LO)  # at the upper bound: the known optimum
    # a maximum of the negated unit: the lower bound
    neg = render(linear_unit(-1.0), O.channel("0", [0]), SHAPE, {}, steps=400, lr=0.1, seeds=[0],
                 data_range=(LO, HI), converge=conv)
    assert neg.info["converged"].all() and neg.images[0, 2:-2, 2:-2, 2:-2].max() < LO + 0.05 * (HI - LO)
    # unbounded, the objective of a linear unit grows by the same amount every step: never a plateau
    free = render(linear_unit(), O.channel("0", [0]), SHAPE, {"range": "none"}, steps=96, lr=0.1, seeds=[0],
                  converge=conv)
    assert not free.info["converged"].any() and (free.info["steps_run"] == 96).all()


def dead_unit(weight, bias):
    """A 3x3x3 convolution of constant ``weight`` and ``bias``, then a ReLU (the unit read)."""
    conv = nn.Conv3d(1, 1, 3)
    conv.weight.data.fill_(weight)
    conv.bias.data.fill_(bias)
    return nn.Sequential(conv, nn.ReLU()).eval()


def test_a_dead_start_is_stopped_but_not_converged():
    """Every unit at zero behind the ReLU and no gradient reaching the image: the objective is a constant; a
    flat line is no plateau reached by climbing."""
    c = dict(rtol=0.02, every=8, min_steps=32)
    dead = dead_unit(0.0, -1.0)
    res = render(dead, O.channel("1", [0, 0]), SHAPE, {}, steps=200, lr=0.1, seeds=[0, 1], data_range=(LO, HI),
                 converge=c)
    assert not res.info["converged"].any() and res.info["stalled"].all()
    assert (res.info["steps_run"] == 32).all()  # stopped at the first check: nothing would ever change
    assert np.array_equal(res.objective_end, res.objective_start)
    # without stopping: still not converged at the end of the budget
    full = render(dead, O.channel("1", [0]), SHAPE, {}, steps=40, lr=0.1, seeds=[0], data_range=(LO, HI),
                  converge=dict(c, enabled=False))
    assert not full.info["converged"].any() and full.info["stalled"].all() and full.info["steps_run"][0] == 40
    # the criterion itself: a constant history is stalled, never converged; a climbed plateau is not stalled
    t = np.arange(64, dtype=float)[:, None]
    hist = np.hstack([np.full_like(t, -0.079), np.minimum(t, 20.0)])
    assert list(Converge(rtol=0.01, every=4, min_steps=8).check(hist, 64)) == [False, True]
    assert list(Converge.stalled(hist, 64)) == [True, False]


def test_a_dead_start_that_can_be_left_is_left_by_the_redirected_relu_gradient():
    """Dead everywhere at the start (27 * 0.02 * 1 SD of noise < 0.6), alive where the image is high: the ReLU's
    gradient is 0, Lucid's redirected gradient raises the image until the unit lives, then it converges."""
    net = dead_unit(0.02, -0.6)
    c = dict(rtol=0.02, every=8, min_steps=32)
    res = render(net, O.channel("1", [0, 0]), SHAPE, {"init_std": 0.1}, steps=300, lr=0.1, seeds=[0, 1],
                 data_range=(LO, HI), converge=c)
    assert (res.objective_start == 0).all() and (res.objective_end > 0.5).all()
    assert res.info["converged"].all() and not res.info["stalled"].any()
    # the same values as a plain ReLU: only the gradient of an element with none passing is redirected
    from brainfv.featviz.simplify import RedirectedReLU

    x = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    y = RedirectedReLU()(x)
    assert torch.equal(y, torch.relu(x))
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())  # live elements: the ordinary ReLU gradient


def test_plateau_criterion_reads_the_last_quarter():
    c = Converge(rtol=0.01, every=4, min_steps=8)
    t = np.arange(64, dtype=float)[:, None]
    rising = t * 1.0                              # constant slope: a quarter of the gain in the last quarter
    flat = np.minimum(t, 20.0)                    # reached its optimum at step 20
    noisy = flat + np.where(t % 2, 0.5, -0.5)     # the same with jitter noise: still a plateau
    slow = 20 * np.log1p(t)                       # still rising by more than 1 % a quarter at step 64
    hist = np.hstack([rising, flat, noisy, slow])
    assert list(c.check(hist, 64)) == [False, True, True, False]
    assert list(c.check(hist, 24)) == [False, False, False, False]  # step 20 is in the last quarter of 24


def test_stopped_elements_are_frozen_and_match_their_run_alone():
    m = small_model()
    vols = real_volumes()
    # voxels: bit-identical alone and in a batch (batched FFTs differ in the last bits, which the plateau test can
    # turn into a step earlier or later)
    preset = {"jitter": 1}
    conv = dict(rtol=0.2, every=4, min_steps=8)  # lenient, so elements stop at different steps
    kw = dict(steps=40, lr=0.1, data_range=(LO, HI), real_volumes=vols, converge=conv, micro_batch=1)
    batch = render(m, O.channel("block2.norm", [0, 3, 5]), SHAPE, preset, seeds=[11, 12, 13], **kw)
    run = batch.info["steps_run"]
    assert run.min() < 40, "the test needs an element that stops early"
    assert batch.info["element_steps"] == run.sum()  # stopped elements leave the batch
    for b, (unit, seed) in enumerate(zip([0, 3, 5], [11, 12, 13])):
        alone = render(m, O.channel("block2.norm", [unit]), SHAPE, preset, seeds=[seed], **kw)
        assert alone.info["steps_run"][0] == run[b]
        assert np.array_equal(alone.images[0], batch.images[b])  # the same optimisation
        # an element that stopped at step n holds exactly the image of n steps without a stopping rule
        fixed = render(m, O.channel("block2.norm", [unit]), SHAPE, preset, seeds=[seed],
                       **dict(kw, steps=int(run[b]), converge=dict(conv, enabled=False)))
        assert np.array_equal(fixed.images[0], alone.images[0])


def test_penalty_weights_mean_the_same_on_a_network_with_100_times_the_output():
    m = small_model()
    big = small_model()
    big.classifier.weight.data.mul_(100)
    big.classifier.bias.data.mul_(100)
    vols = real_volumes()
    preset = {"tv": 0.5, "l2": 0.05}
    kw = dict(steps=24, lr=0.05, seeds=[3], data_range=(LO, HI), real_volumes=vols, micro_batch=1,
              converge={"enabled": False}, amp=False)  # exact in fp32; bf16 rounds 100x larger values differently
    a = render(m, O.channel("classifier", [1]), SHAPE, preset, **kw)
    b = render(big, O.channel("classifier", [1]), SHAPE, preset, **kw)
    assert np.allclose(a.info["scale"] * 100, b.info["scale"], rtol=1e-4)
    assert np.allclose(a.images, b.images, atol=1e-4)
    assert np.isclose(a.objective_end[0] * 100, b.objective_end[0], rtol=1e-3)  # tables keep the raw objective
    # without the normalisation the same weights mean something else on the two networks
    c = render(m, O.channel("classifier", [1]), SHAPE, preset, normalise=False, **kw)
    d = render(big, O.channel("classifier", [1]), SHAPE, preset, normalise=False, **kw)
    assert np.abs(c.images - d.images).max() > 1e-2


def test_cascade_randomizes_from_the_top_and_leaves_lower_stages_bit_identical():
    m = small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    stages = cascade_stages(m)
    assert stages == ["block1", "block2", "block3", "classifier"]
    steps = cascade(m, 5)
    assert [s for s, _ in steps] == [["classifier"], ["classifier", "block3"], ["classifier", "block3", "block2"],
                                     ["classifier", "block3", "block2", "block1"]]
    for k, (done, net) in enumerate(steps):
        for name, v in net.state_dict().items():
            stage = name.split(".")[0]
            if stage not in done or "running" in name or "num_batches" in name:
                assert torch.equal(v, before[name]), (k, name)  # below the cut, and statistics: untouched
            elif name.endswith("weight") and "norm" not in name:
                assert not torch.equal(v, before[name]), (k, name)
        if k:  # cumulative: a stage randomized earlier keeps the same random weights
            prev = steps[k - 1][1].state_dict()
            for name, v in net.state_dict().items():
                if name.split(".")[0] in steps[k - 1][0]:
                    assert torch.equal(v, prev[name])
    full = randomized_copy(m, 5)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), steps[-1][1].state_dict().values()))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the caller's model is untouched


@pytest.mark.parametrize("preset", [{}, {"param": "fourier"}, {"param": "maco"}, {"init": "volume"},
                                    {"init": "subject"}, {"init": "template", "param": "fourier"}])
def test_trained_network_and_controls_start_from_the_same_image(preset):
    m = small_model()
    vols = real_volumes()
    val = real_volumes(2)[::-1]
    template = np.asarray(vols[0]) * 0.5
    kw = dict(shape=SHAPE, mask=np.ones(SHAPE, bool), real_volumes=vols, test_volumes=vols[:2], seed=1, task="t",
              regularizer="r", steps=1, lr=1e-7, n_seeds=2, init_volumes=val, template=template)
    start = [visualize_layer(net, "block2.norm", [0, 1], preset, **kw).images
             for net in (m, randomized_copy(m, 3), cascade(m, 3)[0][1])]
    assert np.allclose(start[0], start[1], atol=1e-5) and np.allclose(start[0], start[2], atol=1e-5)
    if preset.get("init") == "subject":  # the validation volume, not a test volume
        assert np.corrcoef(start[0][0, 0].ravel(), val[0].ravel())[0, 1] > 0.99


def test_visualize_job_writes_steps_converged_and_the_cascade(tmp_path):
    import nibabel as nib
    import pandas as pd
    from conftest import toy_dataset

    from brainfv.jobs.base import Job
    from brainfv.jobs.featviz import visualize_job
    from brainfv.models import save_checkpoint

    ds = toy_dataset(tmp_path / "toy", n=12, shape=(12, 14, 12))
    ck = tmp_path / "model.pt"
    save_checkpoint(ck, build_model({"channels": [4, 8]}).eval(), classes=["A", "B"], task="toy", target="label")
    out = {k: str(tmp_path / f) for k, f in (("nifti", "units.nii.gz"), ("randomized", "randomized.nii.gz"),
                                             ("cascade", "cascade.nii.gz"), ("cascade_table", "cascade.tsv"),
                                             ("table", "units.tsv"), ("trajectory", "trajectory.tsv"))}
    request = {"only_unit": None, "task": "toy", "layer": "block2.norm", "module": "block2.norm", "regularizer": "v",
               "units": [0, 3], "objective": "channel", "preset": {"jitter": 1}, "steps": 12, "lr": 0.1,
               "converge": {"min_steps": 4, "every": 4}, "n_seeds": 2, "n_real": 4, "micro_batch": None,
               "device": "cpu", "seed": 1, "randomized": True}
    inputs = {"model": str(ck), **{k: str(ds / f) for k, f in (("participants", "participants.tsv"),
              ("volumes", "volumes.npy"), ("mask", "mask.nii.gz"), ("reference", "reference.nii.gz"))}}
    visualize_job(Job(input=inputs, output=out, params={"request": request, "model": None, "model_key": "m"},
                      log=lambda m: None, rule="visualize"))
    t = pd.read_csv(out["table"], sep="\t")
    assert t["steps"].between(1, 12).all() and t["converged"].isin([True, False]).all()
    c = pd.read_csv(out["cascade_table"], sep="\t")
    assert list(c["cascade_step"].unique()) == [1, 2, 3]  # block2's head, then block2, then block1
    assert c.groupby("cascade_step")["randomized_stages"].first().tolist() == [
        "classifier", "classifier,block2", "classifier,block2,block1"]
    assert nib.load(out["cascade"]).shape == (12, 14, 12, 3 * 2)  # steps x units, first seed


@pytest.mark.parametrize("crop", [False, True])
def test_objective_scale_in_pairs_is_the_spread_of_each_volume_alone(crop):
    """The scale's real volumes go through the network in pairs (one alone takes the CPU's slow convolution);
    each volume's objective is still its own: the spread equals the one computed volume by volume, for an odd
    number of volumes too, and for a neuron read on its receptive field (``box``)."""
    from brainfv.featviz.crop import plan_crop
    from brainfv.featviz.render import objective_scale, prepare_network
    from brainfv.featviz.units import capture_activations

    m = small_model()
    obj = O.neuron("block2.norm", [0, 3], (2, 3, 2)) if crop else O.channel("block2.norm", [0, 3, 5])
    net = prepare_network(m, obj.layers)
    plan = plan_crop(net, obj, SHAPE, torch.device("cpu")) if crop else None
    box = plan.box if plan is not None else None
    if crop:
        assert box is not None, "the test needs a cropped neuron"
    vols = real_volumes(5)
    B = len(obj.units[0][1])
    got = objective_scale(net, obj, vols, B, device=torch.device("cpu"), plan=plan, box=box)
    one = []
    for v in vols:
        x = torch.as_tensor(v[box] if box is not None else v)[None, None]
        with torch.no_grad():
            acts = capture_activations(net, x, obj.layers)
        acts = {k: a.expand((B,) + tuple(a.shape[1:])) for k, a in acts.items()}
        one.append(obj(plan.activations(acts) if plan is not None else acts, slice(0, B)))
    want = torch.stack(one).std(0)
    assert torch.allclose(got, want, rtol=1e-5)
    assert len(set(np.round(got.numpy(), 6))) == B  # each element its own unit's spread


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["voxel", "fourier", "maco"])
def test_parametrisations_make_a_subset_of_their_batch_as_in_the_whole_batch(kind, threads):
    from brainfv.featviz.param import takes_rows

    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # a lone FFT differed from the batch's at 1 thread on this grid
    try:
        gens = [torch.Generator().manual_seed(s) for s in range(5)]
        common = dict(value_range="data", data=(LO, HI))
        if kind == "voxel":
            p = VoxelParam(SHAPE, gens, init_std=3.0, project=True, **common)
        elif kind == "fourier":
            p = FourierParam(SHAPE, gens, init_std=3.0, project=True, **common)
        else:
            p = MacoParam(SHAPE, gens, torch.rand(SHAPE[:2] + (SHAPE[2] // 2 + 1,)) * 50, **common)
        assert takes_rows(p)
        full = p().detach()
        for rows in ([1, 3], [0, 2, 4], [2], [4]):
            r = torch.tensor(rows)
            assert torch.equal(p(rows=r).detach(), full[r])
        if kind != "maco":  # projecting some rows leaves the others as they were, and those as the whole batch's
            with torch.no_grad():
                next(p.parameters()).mul_(1.7)
            q = next(p.parameters()).detach().clone()
            whole = copy.deepcopy(p)
            whole.project_()
            for rows in ([1, 3], [2]):
                part = copy.deepcopy(p)
                part.project_(rows=torch.tensor(rows))
                after, others = next(part.parameters()).detach(), [i for i in range(5) if i not in rows]
                assert torch.equal(after[others], q[others])
                assert torch.equal(after[rows], next(whole.parameters()).detach()[rows])
            assert not torch.equal(next(whole.parameters()).detach(), q)  # the projection had something to do
    finally:
        torch.set_num_threads(before)


def test_only_parametrisations_that_take_rows_are_asked_for_some():
    from brainfv.featviz.param import takes_rows

    class Plain(nn.Module):
        def forward(self):
            return torch.zeros(1)

    class RowsNoProjection(nn.Module):
        def forward(self, rows=None):
            return torch.zeros(1)

    class RowsButWholeProjection(RowsNoProjection):
        def project_(self):
            pass

    assert not takes_rows(Plain()) and takes_rows(RowsNoProjection()) and not takes_rows(RowsButWholeProjection())


def _stopping(**extra):
    conv = dict(rtol=0.2, every=4, min_steps=8)  # lenient, so elements stop at different steps
    return dict(steps=40, lr=0.1, data_range=(LO, HI), real_volumes=real_volumes(), converge=conv, **extra)


@pytest.mark.parametrize("preset", [{"param": "fourier", "jitter": 1, "lr": 0.05}, {"param": "maco", "jitter": 1},
                                    {"jitter": 1}])
def test_only_the_active_elements_images_are_made_and_nothing_changes(preset, monkeypatch):
    """Once elements stop, the loop makes the images of the active ones only (a Fourier step is four FFTs): the
    same optimisation, bit for bit, as transforming the whole batch and dropping the stopped elements."""
    R = importlib.import_module("brainfv.featviz.render")  # the module (the package exports its function render)

    m = small_model()
    obj = O.channel("block2.norm", [0, 3, 5, 1])
    asked = []
    for cls in (VoxelParam, FourierParam, MacoParam):
        def spy(self, rows=None, _orig=cls.forward):
            asked.append(None if rows is None else rows.numel())
            return _orig(self, rows)
        monkeypatch.setattr(cls, "forward", spy)
    some = render(m, obj, SHAPE, preset, seeds=[11, 12, 13, 14], **_stopping())
    monkeypatch.setattr(R, "takes_rows", lambda p: False)
    n_some = len(asked)
    whole = render(m, obj, SHAPE, preset, seeds=[11, 12, 13, 14], **_stopping())
    run = some.info["steps_run"]
    assert np.sort(run)[-2] < run.max()  # elements stopped at different steps, one ran on alone
    sizes = set(asked[:n_some]) - {None}  # subsets asked for (a lone element too), and never on the whole path
    assert 1 in sizes and sizes <= {1, 2, 3} and set(asked[n_some:]) == {None}
    assert np.array_equal(run, whole.info["steps_run"])
    assert np.array_equal(some.images, whole.images)
    assert np.array_equal(some.trajectory, whole.trajectory)


def test_a_parametrisation_without_rows_runs_on_its_whole_batch():
    from brainfv.featviz.param import takes_rows
    from brainfv.featviz.render import preset_pieces

    class Plain(nn.Module):  # a user's parametrisation: forward() and project_() of the whole batch only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self):
            return self.inner()

        def project_(self):
            self.inner.project_()

    def pieces(shape, gens, box):
        pc = preset_pieces(Preset.from_config({"jitter": 1}), shape, gens, None, None, box, (LO, HI))
        pc.param = Plain(pc.param)
        assert not takes_rows(pc.param)
        return pc

    m = small_model()
    obj = O.channel("block2.norm", [0, 3, 5, 1])
    plain = render(m, obj, SHAPE, {"jitter": 1}, seeds=[11, 12, 13, 14], pieces=pieces, **_stopping())
    own = render(m, obj, SHAPE, {"jitter": 1}, seeds=[11, 12, 13, 14], **_stopping())
    assert plain.info["steps_run"].min() < plain.info["steps_run"].max()
    assert np.array_equal(plain.images, own.images)
