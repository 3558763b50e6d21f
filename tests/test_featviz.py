import numpy as np
import pytest
import torch
from conftest import small_model
from torch import nn

from brainfv.errors import UnitError
from brainfv.featviz import objectives as O
from brainfv.featviz import render
from brainfv.featviz.param import FourierParam, MacoParam, spectrum_scale
from brainfv.featviz.render import crop_box
from brainfv.featviz.study import visualize_layer
from brainfv.featviz.transforms import gaussian_blur, jitter, random_affine
from brainfv.featviz.units import capture_activations, parse_unit
from brainfv.models import build_model

SHAPE = (24, 28, 24)
R = (-3.0, 4.0)  # the intensity range of range: data (real brains: their brain voxels' percentiles)


def corr(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def test_known_filter_is_recovered():
    torch.manual_seed(1)
    conv = nn.Conv3d(1, 1, 5, bias=False)
    w = torch.randn(5, 5, 5)
    w = gaussian_blur(w[None, None], 0.7)[0, 0]  # a smooth, structured filter
    conv.weight.data[:] = w
    model = nn.Sequential(conv)
    # unbounded: the L2 optimum of a linear unit is proportional to its weights only where no bound cuts it
    res = render(model, O.neuron("0", [0]), (20, 20, 20), {"l2": 1.0, "init_std": 0.01, "range": "none"}, steps=300,
                 lr=0.05,
                 seeds=[3], data_range=R)
    box = res.box
    assert box is not None and tuple(s.stop - s.start for s in box) == (5, 5, 5)
    assert corr(res.images[0][box], w.numpy()) >= 0.9
    assert res.objective_end[0] > res.objective_start[0]


def test_fourier_roundtrip_and_scaling():
    shape = (16, 20, 12)
    vol = torch.randn(shape)
    g = [torch.Generator().manual_seed(0)]
    p = FourierParam(shape, g, decay=1.0, value_range="none")
    p.spectrum.data[:] = p.to_spectrum(vol)[None, None]
    assert torch.allclose(p()[0, 0], vol, atol=1e-4)
    s = spectrum_scale(shape, decay=1.5)
    n = np.sqrt(np.prod(shape))
    assert np.isclose(float(s[0, 0, 0]), max(shape) ** 1.5 * n, rtol=1e-5)        # DC: clamped at 1/max(size)
    assert np.isclose(float(s[4, 0, 0]), (16 / 4) ** 1.5 * n, rtol=1e-5)           # f = 4/16 = 0.25 c/vox
    assert np.isclose(float(s[0, 0, 3]), (12 / 3) ** 1.5 * n, rtol=1e-5)
    # white spectrum variables give 1/f^decay amplitudes: low frequencies dominate
    img = FourierParam(shape, g, decay=1.0, value_range="none")()[0, 0].detach().numpy()
    from brainfv.featviz.metrics import high_frequency_fraction

    assert high_frequency_fraction(img) < high_frequency_fraction(np.random.default_rng(0).normal(size=shape))


def test_maco_keeps_magnitude():
    shape = (12, 12, 12)
    mag = torch.fft.rfftn(torch.randn(shape)).abs()
    p = MacoParam(shape, [torch.Generator().manual_seed(0)], mag, value_range="none")
    out = p()[0, 0].detach()
    assert torch.allclose(torch.fft.rfftn(out).abs()[1:-1, 1:-1, 1:-1], mag[1:-1, 1:-1, 1:-1], rtol=1e-3, atol=1e-3)


def test_transforms_do_what_they_say_and_are_differentiable():
    x = torch.zeros(2, 1, 10, 10, 10)
    x[:, :, 5, 5, 5] = 1.0
    x.requires_grad_(True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    y = jitter(x, 2, gens)
    for b in range(2):
        pos = np.argwhere(y[b, 0].detach().numpy() == 1.0)
        assert len(pos) == 1 and np.all(np.abs(pos[0] - 5) <= 2)
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    # blur: a delta becomes the separable Gaussian kernel; mass preserved in the interior
    b = gaussian_blur(x.detach(), 1.0)
    assert np.isclose(float(b.sum()) / 2, 1.0, atol=1e-4) and float(b.max()) < 0.1
    # affine: identity parameters change nothing; rotation keeps the centre blob near the centre
    assert torch.equal(random_affine(x.detach(), gens, 0.0, 0.0), x.detach())
    v = torch.zeros(1, 1, 16, 16, 16, requires_grad=True)
    with torch.no_grad():
        v[0, 0, 6:10, 6:10, 6:10] = 1.0
    r = random_affine(v, [torch.Generator().manual_seed(3)], 0.1, 20)
    com = np.argwhere(r[0, 0].detach().numpy() > 0.5).mean(0)
    assert np.allclose(com, 7.5, atol=1.0) and abs(float(r.detach().sum()) - 64) < 20
    r.sum().backward()
    assert v.grad.abs().sum() > 0


def test_truncated_equals_full():
    m = small_model()
    x = torch.randn(2, 1, *SHAPE)
    for layer in ("block1.norm", "block2.act", "block3.pool", "classifier"):
        a = capture_activations(m, x, [layer], truncate=True)[layer]
        b = capture_activations(m, x, [layer], truncate=False)[layer]
        assert torch.equal(a, b)


@pytest.mark.parametrize("layer", ["block1.conv", "block2.norm", "block2.pool", "block3.act"])
def test_receptive_field_crop_gives_same_activation(layer):
    m = small_model()
    x = torch.randn(1, 1, *SHAPE)
    box, pos = crop_box(m, layer, SHAPE)
    assert box is not None
    full = O.neuron(layer, [1])(capture_activations(m, x, [layer]))
    part = O.neuron(layer, [1], pos)(capture_activations(m, x[(...,) + box], [layer]))
    assert torch.allclose(full, part, atol=1e-5)
    n_crop = np.prod([s.stop - s.start for s in box])
    assert n_crop < np.prod(SHAPE)


def test_batched_equals_per_unit():
    m = small_model()
    preset = {"param": "fourier", "jitter": 2, "scale": 0.05, "rotate": 5, "tv": 0.1}
    seeds = [11, 12, 13]
    # one element per forward pass: identical whether alone or in a batch, up to the batched FFT's last bits — in
    # fp32: in bf16 a last-bit difference of the image can flip a voxel's rounding, and a tie in a max-pool window
    # (frequent among 8-bit mantissas) then sends a gradient to another voxel, so bf16 runs agree as images, not to 1e-5
    batched = render(m, O.channel("block2.norm", [0, 3, 5]), SHAPE, preset, steps=8, seeds=seeds, micro_batch=1,
                     data_range=R, amp=False)
    alone = render(m, O.channel("block2.norm", [3]), SHAPE, preset, steps=8, seeds=[12], micro_batch=1, data_range=R,
                   amp=False)
    assert np.allclose(batched.images[1], alone.images[0], atol=1e-5)
    assert np.isclose(batched.objective_end[1], alone.objective_end[0], rtol=1e-5, atol=1e-6)
    # default CPU micro-batches (2 elements): the same optimisation up to float-level kernel differences
    fast = render(m, O.channel("block2.norm", [0, 3, 5]), SHAPE, preset, steps=8, seeds=seeds, data_range=R,
                  amp=False)
    assert corr(fast.images[1], alone.images[0]) > 0.95
    simple = {"param": "fourier", "jitter": 2}
    b2 = render(m, O.channel("block2.norm", [0, 3, 5]), SHAPE, simple, steps=8, seeds=seeds, data_range=R)
    a2 = render(m, O.channel("block2.norm", [3]), SHAPE, simple, steps=8, seeds=[12], data_range=R)
    # batch 2 and batch 1 convolutions differ in the last bits (both ~1e-6, with or without BatchNorm
    # folding); a max-pool near-tie can turn that into another voxel's gradient, so: the same image, not bits
    assert corr(b2.images[1], a2.images[0]) > 0.99
    again = render(m, O.channel("block2.norm", [0, 3, 5]), SHAPE, preset, steps=8, seeds=seeds, data_range=R,
                   amp=False)
    assert np.array_equal(fast.images, again.images)  # reproducible
    bf16 = [render(m, O.channel("block2.norm", [0, 3, 5]), SHAPE, preset, steps=8, seeds=seeds, data_range=R,
                   amp=True).images for _ in range(2)]
    assert np.array_equal(*bf16)  # in bf16 too
    one = render(m, O.channel("block2.norm", [3]), SHAPE, preset, steps=8, seeds=[12], data_range=R, amp=True)
    assert corr(bf16[0][1], one.images[0]) > 0.9  # in bf16 batched and alone: the same image, not the same bits


def test_objectives_compose_and_increase():
    m = small_model()
    obj = O.channel("block2.norm", [0, 1]) - 0.5 * O.channel("block1.norm", [2, 2])
    res = render(m, obj, SHAPE, {"l2": 0.01}, steps=15, seeds=[1, 2], data_range=R)
    assert np.all(res.objective_end > res.objective_start)
    assert res.trajectory.shape[1] == 2
    neg = render(m, -O.class_logit([1]), SHAPE, {}, steps=10, seeds=[1], data_range=R)
    assert neg.objective_end[0] > neg.objective_start[0]


def test_works_on_foreign_models():
    seq = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ELU(), nn.MaxPool3d(2), nn.Conv3d(6, 4, 3, padding=1))

    class Net(nn.Module):  # MONAI-style nesting: encoder.layers.N
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.layers = seq
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.encoder.layers(x).mean((2, 3, 4)))

    net = Net().eval()
    layer, ch = parse_unit("encoder.layers.3:2")
    res = render(net, O.channel(layer, [ch, 0]), (16, 16, 16), {"jitter": 1}, steps=10, seeds=[0, 1], data_range=R)
    assert res.images.shape == (2, 16, 16, 16) and np.all(res.objective_end > res.objective_start)
    res = render(seq.eval(), O.neuron("3", [1]), (16, 16, 16), {}, steps=5, seeds=[0], data_range=R)
    assert res.box is not None


def test_bad_units_are_explained():
    m = small_model()
    with pytest.raises(UnitError, match="layer 'block9.conv' is not in the model.*block1.conv"):
        render(m, O.channel("block9.conv", [0]), SHAPE, {}, steps=1, seeds=[0], data_range=R)
    with pytest.raises(UnitError, match=r"channels \[8\] out of range for layer 'block2.conv', which has 8"):
        render(m, O.channel("block2.conv", [8]), SHAPE, {}, steps=1, seeds=[0], data_range=R)
    with pytest.raises(UnitError, match="layer:channel"):
        parse_unit("block2.conv")


def test_visualize_layer_table():
    m = small_model()
    mask = np.ones(SHAPE, bool)
    real = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(4)]
    r = visualize_layer(
        m, "block2.norm", [0, 2], {"param": "maco", "jitter": 1}, shape=SHAPE, mask=mask, real_volumes=real,
        test_volumes=real, seed=1, task="t", regularizer="maco", steps=6, n_seeds=2, record_every=2)
    t = r.table
    assert r.images.shape == (2, 2) + SHAPE and r.result.info["batch"] == 4
    assert list(t["unit"]) == [0, 0, 2, 2] and list(t["seed"]) == [0, 1, 0, 1] and (t["network"] == "trained").all()
    assert list(t["volume"]) == [0, 2, 1, 3]  # seed-major, like the batch
    assert t["stability"].between(-1, 1).all() and np.isfinite(t["real_max"]).all()
    assert t["energy_inside_mask"].between(0, 1).all() and np.isfinite(t["act_matched_z"]).all()
    assert len(r.trajectory) == 2 * len(r.result.trajectory_steps)
    # the activation at matched amplitude: the visualization shifted and rescaled to the real volumes' mean and
    # SD in the optimised region, then scored
    from brainfv.featviz.study import own_objective_values

    v = r.images[0, 0]
    sd = v[mask].std()
    real_sd, real_mean = np.mean([x.std() for x in real]), np.mean([x.mean() for x in real])
    matched = (v - v.mean()) * real_sd / sd + real_mean
    assert np.isclose(t["act_matched"].iloc[0], own_objective_values(m, [matched], "block2.norm", [0])[0],
                      rtol=1e-4, atol=1e-5)


def test_init_from_mean_volume():
    m = small_model()
    real = [np.random.default_rng(i).normal(size=SHAPE).astype(np.float32) for i in range(3)]
    r = visualize_layer(
        m, "block1.norm", [0], {"init": "volume", "init_std": 0.0}, shape=SHAPE, mask=np.ones(SHAPE, bool),
        real_volumes=real, test_volumes=[], seed=1, task="t", regularizer="mean", steps=1, n_seeds=1, lr=1e-6)
    assert corr(r.images[0, 0], np.mean(real, 0)) > 0.999


def test_randomized_copy_changes_weights_not_the_caller():
    from brainfv.featviz.controls import randomized_copy

    m = small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = torch.get_rng_state()
    r = randomized_copy(m, 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    changed = [k for k, v in r.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    weights = [k for k in before if k.endswith("weight") and "norm" not in k]  # BatchNorm re-inits to 1
    assert set(weights) <= set(changed)
    again = randomized_copy(m, 3)
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), again.state_dict().values()))


def test_micro_batches_do_not_change_the_result():
    m = small_model()
    preset = {"param": "fourier", "jitter": 1, "tv": 0.1}
    obj = O.channel("block2.norm", [0, 1, 2])
    a = render(m, obj, SHAPE, preset, steps=5, seeds=[4, 5, 6], micro_batch=1, data_range=R)
    b = render(m, obj, SHAPE, preset, steps=5, seeds=[4, 5, 6], micro_batch=3, data_range=R)
    # the same optimisation, up to float-level differences of the CPU kernels for other batch sizes
    assert all(corr(a.images[i], b.images[i]) > 0.98 for i in range(3))
    assert np.allclose(a.objective_end, b.objective_end, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("layer", ["block2.norm", "block1.act", "block2.conv", "block3.pool", "classifier"])
def test_simplified_network_is_exact(layer):
    from brainfv.featviz.simplify import simplify_for_featviz

    m = small_model()
    s, changes = simplify_for_featviz(m, keep=[layer])
    names = dict(s.named_modules())
    assert any(c.startswith("fold") for c in changes) and any("after" in c for c in changes)
    if layer.endswith(".conv"):  # a requested conv keeps its BatchNorm; a requested activation stays in place
        assert isinstance(names[layer.replace("conv", "norm")], nn.BatchNorm3d)
    if layer.endswith(".act"):
        assert isinstance(names[layer], nn.ReLU)
    x = torch.randn(2, 1, *SHAPE, requires_grad=True)
    a = capture_activations(m, x, [layer])[layer]
    b = capture_activations(s, x, [layer])[layer]
    ga, = torch.autograd.grad((a * torch.linspace(-1, 1, a.numel()).view_as(a)).sum(), x)
    gb, = torch.autograd.grad((b * torch.linspace(-1, 1, b.numel()).view_as(b)).sum(), x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert corr(ga, gb) > 0.999  # a max-pool tie can flip on a last-bit difference, nothing more
    assert all(isinstance(mod, nn.BatchNorm3d) for n, mod in m.named_modules() if n.endswith("norm"))  # untouched


def test_simplify_leaves_what_it_cannot_prove():
    from brainfv.featviz.simplify import simplify_for_featviz

    class Residual(nn.Module):  # the conv output is read twice: folding its BatchNorm would change the sum
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv3d(1, 1, 3, padding=1), nn.BatchNorm3d(1)
            self.act, self.pool = nn.GELU(), nn.MaxPool3d(2)  # GELU is not monotone: it must stay first

        def forward(self, x):
            y = self.conv(x)
            return self.pool(self.act(self.norm(y) + y))

    r = Residual().eval()
    assert simplify_for_featviz(r)[1] == [  # no fold, no move; what is exact whatever the graph is still done
        "conv (one input channel) input gradient by a depthwise convolution", "pool in the input's precision"]

    class Branchy(nn.Module):  # data-dependent control flow: not traceable, used as it is
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)

        def forward(self, x):
            return self.norm(self.conv(x)) if x.sum() > 0 else self.conv(x)

    b = Branchy().eval()
    s, changes = simplify_for_featviz(b)
    assert changes == [] and s is not b
    m = small_model()
    flags = [p.requires_grad for p in m.parameters()]
    render(m, O.channel("block2.norm", [0]), SHAPE, {}, steps=1, seeds=[0], data_range=R)
    assert [p.requires_grad for p in m.parameters()] == flags and isinstance(m.block1.norm, nn.BatchNorm3d)


def _objective_on(model, obj, images):
    """The objective evaluated on full-size images with the unmodified model (the reference)."""
    with torch.no_grad():
        x = torch.as_tensor(images)[:, None]
        return obj(capture_activations(model, x, obj.layers)).numpy()


@pytest.mark.parametrize("make", [
    lambda: -O.neuron("block2.norm", [1, 3]),
    lambda: 2.5 * O.neuron("block2.norm", [1, 3]),
    lambda: O.neuron("block2.norm", [1, 3]) * 0.5 - 1.0,
    lambda: O.neuron("block2.norm", [1, 3]) + O.channel("block1.norm", [0, 2]),
    lambda: O.neuron("block2.norm", [1, 3]) - O.neuron("block1.norm", [0, 0]),
])
@pytest.mark.parametrize("micro_batch", [1, 2])
def test_composed_objectives_are_optimised_as_written(make, micro_batch):
    """Crop, truncation and micro-batches never change what is optimised: the objective reported equals the
    composed objective recomputed on the full-size result, and it increased."""
    m = small_model()
    obj = make()
    res = render(m, obj, SHAPE, {"jitter": 1}, steps=6, lr=0.1, seeds=[1, 2], micro_batch=micro_batch, data_range=R)
    assert np.allclose(res.objective_end, _objective_on(m, obj, res.images), rtol=1e-3, atol=1e-4)
    assert res.objective_end.mean() > res.objective_start.mean()
    whole_maps = obj.footprint is None
    assert (res.box is None) == whole_maps  # neuron-only objectives are cropped, whatever the operators


def test_negated_neuron_lowers_the_activation():
    m = small_model()
    plain = O.neuron("block2.norm", [2])
    up = render(m, plain, SHAPE, {}, steps=8, lr=0.1, seeds=[5], data_range=R)
    down = render(m, -plain, SHAPE, {}, steps=8, lr=0.1, seeds=[5], data_range=R)
    assert up.box is not None and down.box is not None
    act_up, act_down = _objective_on(m, plain, up.images)[0], _objective_on(m, plain, down.images)[0]
    start = up.objective_start[0]
    assert act_up > start > act_down  # the same start (same seed), opposite directions


def test_crop_plan_covers_every_neuron_of_a_sum():
    from brainfv.featviz.crop import plan_crop

    m = small_model()
    a = O.neuron("block2.norm", [0], (2, 2, 2))
    b = O.neuron("block2.norm", [0], (4, 4, 4))
    plan = plan_crop(m, a + b, SHAPE)
    plan_a = plan_crop(m, a, SHAPE)
    assert plan is not None and all(p.start <= q.start and p.stop >= q.stop for p, q in zip(plan.box, plan_a.box))
    assert plan_crop(m, a + O.channel("block2.norm", [0]), SHAPE) is None  # a whole map: no crop


def test_feature_accentuation_starts_from_a_subject_and_stays_near_it():
    m = small_model()
    subject = np.random.default_rng(9).normal(size=SHAPE).astype(np.float32)
    kw = dict(shape=SHAPE, mask=np.ones(SHAPE, bool), real_volumes=[subject], test_volumes=[subject], seed=1, task="t",
              regularizer="acc", steps=10, n_seeds=1, lr=0.01)
    free = visualize_layer(m, "block2.norm", [1], {"init": "subject", "init_std": 0.0}, **kw)
    anchored = visualize_layer(m, "block2.norm", [1], {"init": "subject", "init_std": 0.0, "anchor": 50.0}, **kw)
    assert corr(free.images[0, 0], subject) > 0.9  # an accentuation of the subject, not a new image
    assert np.abs(anchored.images[0, 0] - subject).mean() < np.abs(free.images[0, 0] - subject).mean()
    assert (free.table["objective_end"] > free.table["objective_start"]).all()
    tpl = visualize_layer(m, "block2.norm", [1], {"init": "template", "init_std": 0.0}, template=subject * 0.5, **kw)
    assert corr(tpl.images[0, 0], subject) > 0.9


def test_receptive_field_stops_at_a_skip_connection():
    """A chain's receptive field is known; after a residual add (a side branch) it is not, and no crop is planned."""
    from brainfv.featviz.units import describe_units, receptive_field

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.act = nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(inplace=True)
            self.conv2, self.conv3 = nn.Conv3d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 3, padding=1)

        def forward(self, x):
            y = self.act(self.conv1(x))
            z = self.conv2(y)
            z += y  # in place, as ResNet blocks do
            return self.conv3(self.act(z))

    m = Res().eval()
    assert receptive_field(m, "conv2", (1, 12, 12, 12)) == ((5, 1, 2),) * 3
    assert receptive_field(m, "conv3", (1, 12, 12, 12)) is None
    rows = {r["layer"]: r for r in describe_units(m, (1, 12, 12, 12))}
    assert rows["conv2"]["rf_size"] == (5, 5, 5) and rows["conv3"]["rf_size"] is None
    assert crop_box(m, "conv3", (12, 12, 12))[0] is None


def test_frozen_copy_is_channels_last_even_for_one_input_channel():
    """A (C, 1, k, k, k) weight counts as contiguous in both layouts; oneDNN reads the strides, and the
    plain ones made every optimisation step 2.5x slower on the CPU. Other tensors (4D buffers) are kept."""
    import torch

    from brainfv.models import frozen

    net = build_model({"channels": [4, 8]})
    net.register_buffer("masks", torch.zeros(2, 3, 3, 3))
    f = frozen(net)
    w = f.block1.conv.weight
    assert w.shape[1] == 1 and w.stride() == w.to(memory_format=torch.channels_last_3d).stride() and w.stride()[1] == 1
    assert all(p.stride() == p.to(memory_format=torch.channels_last_3d).stride()
               for p in f.parameters() if p.dim() == 5)
    assert f.masks.shape == (2, 3, 3, 3) and not any(p.requires_grad for p in f.parameters())
    assert net.block1.conv.weight.requires_grad                      # the caller's model is untouched


def test_undefined_correlations_are_nan_and_wm_is_partialled_out():
    from brainfv.featviz.metrics import correlation, partial_correlation

    rng = np.random.default_rng(0)
    wm = rng.random((12, 12, 12))
    assert np.isnan(correlation(np.zeros((12, 12, 12)), wm))
    # a map that is only "dark in white matter" correlates with a white-matter lesion map, but not beyond WM
    lesion_map = 0.5 * wm + 0.05 * rng.random(wm.shape)
    darkness = wm + 0.05 * rng.random(wm.shape)
    assert correlation(darkness, lesion_map) > 0.9
    assert abs(partial_correlation(darkness, lesion_map, wm)) < 0.15
    # darkness that follows the lesions beyond WM keeps its correlation
    extra = rng.random(wm.shape)
    assert partial_correlation(wm + extra, 0.5 * wm + extra, wm) > 0.95
    assert partial_correlation(darkness, lesion_map, None) == correlation(darkness, lesion_map)


def test_each_trained_replicate_draws_its_own_start_images_and_control():
    """Replicate 0 keeps the study seed (its results unchanged); every other replicate has its own, the same for
    every task (the other-model control of replicate r is the other task's replicate r, from the same images)."""
    from brainfv.jobs.featviz import replicate_seed

    seeds = [replicate_seed({"seed": 7, "replicate": r, "task": t}) for r in range(3) for t in ("a", "b")]
    assert seeds[0] == seeds[1] == 7 and seeds[2] == seeds[3] and seeds[4] == seeds[5]
    assert len({seeds[0], seeds[2], seeds[4]}) == 3


def test_large_kernels_run_by_fft_with_the_same_activations_and_gradients():
    from brainfv.featviz.simplify import simplify_for_featviz

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 7, padding=3), nn.ReLU(), nn.Conv3d(2, 2, 7, padding=1, bias=False),
                        nn.Conv3d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 7, stride=2), nn.Conv3d(2, 2, 7, dilation=2),
                        nn.Conv3d(2, 2, 7, groups=2, padding=3), nn.Conv3d(2, 2, 9, padding="same"),
                        nn.Conv3d(2, 3, 7, padding=3)).eval().requires_grad_(False)
    s, changes = simplify_for_featviz(net, keep=["2"])
    kinds = [type(m).__name__ for m in s]
    # >= 7^3 taps, stride 1, no dilation or groups, numeric padding, <= 4 channel pairs: by FFT; a kept layer stays
    assert kinds == ["FFTConv3d", "ReLU"] + ["Conv3d"] * 7, kinds
    assert changes == ["0 (7x7x7 kernel) by FFT"] and isinstance(s[0], nn.Conv3d)  # still a Conv3d (its geometry)
    x = torch.randn(2, 1, 19, 22, 17)
    x[:, :, :4] = 0  # a zero region: the direct convolution's exact zeros must stay exact
    x.requires_grad_(True)
    a, b = net[:3](x), s[:3](x)
    sparse = torch.zeros_like(a)
    sparse[:, :, 5, 6, 7], sparse[:, :, -3, 2, 9] = 1.0, -0.5  # a gradient that reaches few voxels
    ga, = torch.autograd.grad((a * sparse).sum(), x)
    gb, = torch.autograd.grad((b * sparse).sum(), x)
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5 * float(ga.abs().max()))
    assert torch.equal(a == 0, b == 0) and torch.equal(ga == 0, gb == 0) and (ga == 0).float().mean() > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the FFT runs in fp32 under autocast
        c = s[0](x)
    ref = net[0](x)
    assert c.dtype == torch.float32 and torch.allclose(c, ref, atol=1e-5 * float(ref.abs().max()))
    assert s[0](x.double()).dtype == torch.float64


def test_positive_control_by_fft_optimises_to_the_same_image(monkeypatch):
    """The case FFT is for (a positive control's lesion template): the same logits and input gradients, the same
    receptive fields and crops, and under plain gradient ascent (Adam normalises each voxel's step by its own
    gradient) the voxels no gradient reaches stay where they started, as with the direct convolution."""
    import brainfv.featviz.simplify as S
    from brainfv.featviz.crop import plan_crop
    from brainfv.featviz.units import receptive_field
    from brainfv.models.positive import narrowed, positive_control_network

    shape = (24, 28, 24)
    pc = positive_control_network(narrowed({"channels": [4, 4, 4], "head": "pool"}, 1), shape, 3.0)
    sp, changes = S.simplify_for_featviz(pc)
    assert isinstance(sp.block1.conv, S.FFTConv3d) and "block1.conv (7x7x7 kernel) by FFT" in changes
    rf = receptive_field(pc, "block2.norm", (1,) + shape)
    assert rf is not None and receptive_field(sp, "block2.norm", (1,) + shape) == rf
    neuron = O.neuron("block2.norm", [0], (3, 3, 3))
    assert plan_crop(sp, neuron, shape) is not None and plan_crop(sp, neuron, shape) == plan_crop(pc, neuron, shape)
    sp.requires_grad_(False)
    x = torch.randn(2, 1, *shape, requires_grad=True)
    ya, yb = pc(x), sp(x)
    ga, = torch.autograd.grad(ya[:, 1].sum(), x)
    gb, = torch.autograd.grad(yb[:, 1].sum(), x)
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-5) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    assert torch.equal(ga == 0, gb == 0)
    obj = O.channel("classifier", [1, 1])  # the 'present' logit, two seeds
    fft = render(pc, obj, shape, {}, steps=24, seeds=[0, 1], data_range=R, amp=False)
    monkeypatch.setattr(S, "FFT_MIN_TAPS", 10 ** 9)  # the direct convolution
    direct = render(pc, obj, shape, {}, steps=24, seeds=[0, 1], data_range=R, amp=False)
    assert np.abs(fft.images - direct.images).max() < 1e-3
    assert np.allclose(fft.objective_end, direct.objective_end, rtol=1e-4)


def test_adam_is_torch_optim_adam_without_its_import_cost():
    from brainfv.featviz.render import Adam

    torch.manual_seed(0)
    ours = [torch.randn(4, 3, 5, 6, 5), torch.randn(4, 7)]
    fused_ref, unfused, single_ref = ([p.clone() for p in ours] for _ in range(3))
    opts = [Adam(ours, lr=0.2), torch.optim.Adam(fused_ref, lr=0.2, fused=True), Adam(unfused, lr=0.2),
            torch.optim.Adam(single_ref, lr=0.2, foreach=False)]
    opts[2].fused = False  # the path of a device (or torch) without the fused kernel
    for _ in range(20):
        grads = [torch.randn_like(p) for p in ours]
        for params in (ours, fused_ref, unfused, single_ref):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for o in opts:
            o.step()
    assert all(torch.equal(x, y) for x, y in zip(ours, fused_ref))  # the same kernels: bit for bit
    assert all(torch.equal(x, y) for x, y in zip(unfused, single_ref))
    opts[0].zero_grad()
    assert all(p.grad is None for p in ours)
    opts[0].step()  # nothing to update: nothing happens
    assert all(torch.equal(x, y) for x, y in zip(ours, fused_ref))


def test_max_pools_in_the_input_precision_are_bit_identical_under_autocast():
    """Non-overlapping max-pools run on the bf16 map instead of autocast's fp32 copy: the same images, bit for bit,
    after a run of bf16 steps (every value, tie and gradient the same); overlapping pools (sums in the gradient)
    stay as they are; receptive fields are unchanged."""
    import brainfv.featviz.simplify as S
    from brainfv.featviz.units import receptive_field

    m = small_model()
    obj = O.channel("classifier", [0, 1])
    kw = dict(steps=12, seeds=[0, 1], data_range=R, amp=True, converge={"enabled": False})
    native = render(m, obj, SHAPE, {"jitter": 1}, **kw)
    orig = S.native_max_pools
    try:
        S.native_max_pools = lambda model: []
        plain = render(m, obj, SHAPE, {"jitter": 1}, **kw)
    finally:
        S.native_max_pools = orig
    assert np.array_equal(native.images, plain.images)
    assert np.array_equal(native.objective_end, plain.objective_end)
    net, changes = S.simplify_for_featviz(m)
    pools = [n for n, x in net.named_modules() if isinstance(x, nn.MaxPool3d)]
    assert pools and all(isinstance(net.get_submodule(n), S.NativeMaxPool3d) for n in pools)
    assert any("precision" in c for c in changes)
    assert receptive_field(net, "block2.norm", (1,) + SHAPE) == receptive_field(m, "block2.norm", (1,) + SHAPE)
    over = nn.Sequential(nn.Conv3d(1, 2, 3), nn.MaxPool3d(3, stride=2), nn.MaxPool3d(2, dilation=2)).eval()
    assert S.native_max_pools(over) == []
    # whatever reads the pooled map (here BatchNorm and ELU, which run in their input's precision): the same bits
    torch.manual_seed(0)
    conv, tail = nn.Conv3d(1, 2, 3), nn.Sequential(nn.BatchNorm3d(2), nn.ELU()).eval()
    for ceil, pad in ((False, 0), (True, 1)):
        out = {}
        for pool in (nn.MaxPool3d(2, ceil_mode=ceil, padding=pad), S.NativeMaxPool3d(nn.MaxPool3d(2, ceil_mode=ceil,
                                                                                                  padding=pad))):
            x = torch.randn(2, 1, 11, 10, 9, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = tail(pool(conv(x)))
            y.float().pow(2).sum().backward()
            out[type(pool).__name__] = (y, x.grad)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pooled = pool(conv(x))
            if isinstance(pool, S.NativeMaxPool3d):  # pooled in bf16, then cast: not autocast's fp32 pool
                assert type(pooled.grad_fn).__name__ == "ToCopyBackward0"
                assert type(pooled.grad_fn.next_functions[0][0]).__name__.startswith("MaxPool3DWithIndicesBackward")
        (ya, ga), (yb, gb) = out.values()
        assert ya.dtype == yb.dtype and torch.equal(ya, yb) and torch.equal(ga, gb)


@pytest.mark.parametrize("kernel,padding,out", [(3, 1, 8), ((3, 5, 7), (0, 2, 3), 2), (1, 0, 4), (3, 0, 1)])
def test_one_channel_conv_input_gradient_by_depthwise_convolution(kernel, padding, out):
    """The first convolution's input gradient as a depthwise convolution and a channel sum: the same output and
    gradient as ``nn.Conv3d`` (fp64 to 1e-12, fp32 to rounding), the exact zeros of a sparse gradient kept; in
    small channel chunks the same; under bf16 autocast and with a trainable weight the ordinary convolution."""
    from brainfv.featviz.simplify import OneChannelConv3d, one_channel_convs

    torch.manual_seed(0)
    conv = nn.Conv3d(1, out, kernel, padding=padding).requires_grad_(False)
    fast = OneChannelConv3d(conv)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = torch.randn(3, 1, 9, 10, 11, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        c, f = conv.to(dtype), fast.to(dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = c(xa), f(xb)
        assert torch.equal(ya, yb)
        assert type(yb.grad_fn).__name__ == "_OneChannelInputGradBackward"  # the depthwise path did run
        g = torch.randn_like(ya) * (torch.rand_like(ya) < 0.02)  # sparse: most voxels get no gradient at all
        ya.backward(g)
        yb.backward(g)
        assert xb.grad.dtype == dtype
        assert torch.allclose(xa.grad, xb.grad, atol=tol * float(xa.grad.abs().max()))
        assert torch.equal(xa.grad == 0, xb.grad == 0)  # Adam moves what has any gradient: the same voxels
        if dtype == torch.float64 and out > 1:  # one channel at a time (large grids): the same gradient
            import brainfv.featviz.simplify as S
            calls = []
            conv3d = torch.nn.functional.conv3d

            def counting(*a, **k):
                calls.append(a[0].shape[1])
                return conv3d(*a, **k)

            chunk, S.ONE_CHANNEL_CHUNK = S.ONE_CHANNEL_CHUNK, 1
            try:
                torch.nn.functional.conv3d = counting
                xc = x.clone().requires_grad_(True)
                f(xc).backward(g)
            finally:
                S.ONE_CHANNEL_CHUNK, torch.nn.functional.conv3d = chunk, conv3d
            assert calls[1:] == [1] * out  # the forward, then one depthwise convolution per channel
            assert torch.allclose(xc.grad, xb.grad, atol=1e-12 * float(xb.grad.abs().max()))
    conv, fast = conv.float(), fast.float()
    x = torch.randn(2, 1, 9, 10, 11).contiguous(memory_format=torch.channels_last_3d)
    grads = {}
    for name, m in (("onednn", conv), ("depthwise", fast)):  # under bf16 autocast: the ordinary convolution
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xr)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        y.backward(g)
        grads[name] = (y, xr.grad)
    assert all(torch.equal(a, b) for a, b in zip(*grads.values()))
    trainable = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    assert one_channel_convs(trainable) == ["0 (one input channel) input gradient by a depthwise convolution"]
    trainable(torch.randn(1, 1, 5, 5, 5)).sum().backward()
    assert trainable[0].weight.grad is not None
    assert one_channel_convs(nn.Sequential(nn.Conv3d(2, 2, 3), nn.Conv3d(1, 2, 3, stride=2))) == []
