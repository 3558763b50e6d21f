"""Loading a user's trained model (every format), checking it against the cohort, listing its units."""
import argparse
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from brainfv.errors import ConfigError, UnitError
from brainfv.featviz.units import capture_activations, describe_units, receptive_field, resolve_units
from brainfv.models import TorchScriptModel, build_model, check_model_input, load_model, save_checkpoint

monai_nets = pytest.importorskip("monai.networks.nets")

SHAPE = (16, 16, 16)
DENSENET = {"name": "monai:DenseNet",
            "kwargs": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 8, "growth_rate": 4,
                       "block_config": [2, 2], "bn_size": 2}}
TINY = {"name": "usernets:TinyNet", "kwargs": {"width": 3, "n_classes": 2}}


def _trained_like(model, seed=0):
    """Random weights and BatchNorm statistics, as after training; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def densenet(seed=0):
    return _trained_like(monai_nets.DenseNet(**DENSENET["kwargs"]), seed)


def x_input(n=2, seed=1):
    return torch.randn((n, 1) + SHAPE, generator=torch.Generator().manual_seed(seed))


def same_output(a, b, x=None):
    x = x_input() if x is None else x
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------------

def test_state_dict_of_a_monai_network_by_name(tmp_path):
    net = densenet()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model, info = load_model({"checkpoint": str(tmp_path / "w.pt"), "architecture": DENSENET})
    assert info["format"] == "state_dict" and info["architecture"] == "monai:DenseNet"
    assert not model.training and info["n_parameters"] == sum(p.numel() for p in net.parameters())
    assert same_output(model, net)


def test_torchscript_export_loads_and_observes_layers_like_the_eager_model(tmp_path):
    net = densenet()
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    model, info = load_model({"checkpoint": str(tmp_path / "ts.pt"), "format": "torchscript"})
    assert isinstance(model, TorchScriptModel) and info["architecture"] == "DenseNet"
    assert same_output(model, net)
    # hooks work through the compiled graph: same activations (norm0 is read before the in-place ReLU)...
    layers = ["features.norm0", "features.denseblock1.denselayer1", "class_layers.out"]
    x = x_input(n=1)
    a = {layer: capture_activations(net, x, [layer])[layer] for layer in layers}
    b = capture_activations(model, x, layers, truncate=False)
    for layer in layers:
        assert torch.allclose(a[layer], b[layer], atol=1e-5), layer
    assert (capture_activations(model, x, ["features.norm0"])["features.norm0"] < 0).any()
    # ... and the same gradients with respect to the input, which activation maximization needs
    grads = []
    for m in (net, model):
        xx = x.clone().requires_grad_()
        capture_activations(m, xx, ["features.transition1.conv"])["features.transition1.conv"][:, 3].mean().backward()
        grads.append(xx.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_render_on_a_torchscript_model_matches_the_eager_model(tmp_path):
    from brainfv.featviz import objectives as O
    from brainfv.featviz import render

    net = densenet()
    torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    model, _ = load_model(str(tmp_path / "ts.pt"))
    obj = O.channel("features.transition1.conv", [0, 1])
    kw = dict(shape=SHAPE, preset={"param": "fourier"}, steps=2, seeds=[1, 2], data_range=(-3.0, 4.0))
    a = render(net, obj, simplify=False, **kw).images
    b = render(model, obj, log=lambda *_: None, **kw).images
    assert np.abs(a).max() > 0 and np.allclose(a, b, atol=1e-4)
    assert all(p.is_leaf for p in model.parameters())  # render's copy did not touch the loaded model


def test_users_own_class_by_module_path(tmp_path):
    from usernets import TinyNet

    net = _trained_like(TinyNet(**TINY["kwargs"]))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model, info = load_model({"checkpoint": str(tmp_path / "w.pt"), "format": "state_dict", "architecture": TINY})
    assert type(model).__name__ == "TinyNet" and same_output(model, net)


def test_whole_pickled_model_only_with_explicit_opt_in(tmp_path):
    net = densenet()
    torch.save(net, tmp_path / "full.pt")
    spec = {"checkpoint": str(tmp_path / "full.pt"), "format": "full"}
    with pytest.raises(ConfigError) as e:
        load_model(spec, where="tasks.mine.model")
    msg = str(e.value)
    assert msg.startswith("tasks.mine.model.allow_pickle:") and "arbitrary code" in msg
    assert "allow_pickle: true" in msg and "torchscript" in msg.lower() and "state_dict" in msg
    with pytest.raises(ConfigError, match="arbitrary code"):  # auto-detection refuses too
        load_model({"checkpoint": spec["checkpoint"]})
    model, info = load_model({**spec, "allow_pickle": True})
    assert info["format"] == "full" and same_output(model, net)
    model, info = load_model({"checkpoint": spec["checkpoint"], "allow_pickle": True})
    assert info["format"] == "full"


def test_brainfv_study_checkpoint_is_recognised_with_its_grid(tmp_path):
    net = build_model({"channels": [4, 8]})
    save_checkpoint(tmp_path / "model.pt", net, classes=["F", "M"], normalisation="z-score within brain mask",
                    grid={"shape": [24, 28, 24], "voxel_size": 8.0, "origin": [0, 0, 0]})
    model, info = load_model(str(tmp_path / "model.pt"))
    assert info["format"] == "brainfv" and info["classes"] == ["F", "M"]
    assert info["input"] == {"shape": [24, 28, 24], "voxel_size": 8.0, "normalisation": "zscore-brain",
                             "channels": 1}
    assert check_model_input(info, (24, 28, 24), 8.0, model) == (2,)


# ------------------------------------------------------------------------------------------------------
# wrapped and prefixed weights; errors
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap, extra, note", [
    (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7}, {}, "'module.'"),
    (lambda sd: {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}}, {}, "'model' entry"),
    (lambda sd: {"ema": {"weights": sd}, "step": 3}, {"state_dict_key": "ema.weights"}, None),
    (lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}}, {}, "'model.'"),  # Lightning
    (lambda sd: {f"net.{k}": v for k, v in sd.items()}, {"strip_prefix": "net."}, "'net.'"),
    (lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, {}, "num_batches"),
])
def test_wrapped_and_prefixed_state_dicts(tmp_path, wrap, extra, note):
    from usernets import TinyNet

    net = _trained_like(TinyNet(**TINY["kwargs"]))
    torch.save(wrap(net.state_dict()), tmp_path / "w.pt")
    model, info = load_model({"checkpoint": str(tmp_path / "w.pt"), "architecture": TINY, **extra})
    assert same_output(model, net)
    if note:
        assert any(note in n for n in info["notes"]), info["notes"]


def test_weights_that_do_not_fit_list_the_keys(tmp_path):
    from usernets import TinyNet

    sd = TinyNet(**TINY["kwargs"]).state_dict()
    sd["stem.0.kernel"] = sd.pop("stem.0.weight")
    del sd["head.bias"]
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ConfigError) as e:
        load_model({"checkpoint": str(tmp_path / "w.pt"), "architecture": TINY}, where="tasks.t.model")
    msg = str(e.value)
    assert msg.startswith("tasks.t.model:") and str(tmp_path / "w.pt") in msg
    assert "2 missing keys" in msg and "stem.0.weight" in msg and "head.bias" in msg
    assert "1 unexpected keys" in msg and "stem.0.kernel" in msg
    torch.save(TinyNet(width=5).state_dict(), tmp_path / "w5.pt")  # the wrong width
    with pytest.raises(ConfigError, match=r"keys of another shape.*stem\.0\.weight.*\(5, 1, 3, 3, 3\), \(3, 1"):
        load_model({"checkpoint": str(tmp_path / "w5.pt"), "architecture": TINY})
    with pytest.raises(ConfigError, match=r"state_dict_key: no entry 'ema'.*its keys are: \[.*'head\.bias'"):
        load_model({"checkpoint": str(tmp_path / "w5.pt"), "architecture": TINY, "state_dict_key": "ema"})


def test_checkpoint_with_python_objects_needs_opt_in(tmp_path):
    from usernets import TinyNet

    net = _trained_like(TinyNet(**TINY["kwargs"]))
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "w.pt")
    spec = {"checkpoint": str(tmp_path / "w.pt"), "format": "state_dict", "architecture": TINY}
    with pytest.raises(ConfigError, match=r"model\.checkpoint: .*argparse\.Namespace.*allow_pickle"):
        load_model(spec)
    model, _ = load_model({**spec, "allow_pickle": True})
    assert same_output(model, net)


@pytest.mark.parametrize("damage", ["random bytes", "truncated zip", "flipped bytes", "truncated legacy pickle",
                                    "random after a pickle header", "empty"])
@pytest.mark.parametrize("fmt", ["auto", "state_dict", "torchscript", "brainfv", "full"])
def test_damaged_file_is_named_damaged_never_a_pickled_model(tmp_path, damage, fmt):
    """A damaged file is said to be damaged, naming the path, under every format, and never gets the
    advice to allow unpickling (which would execute it)."""
    import os

    good = tmp_path / "good.pt"
    legacy = damage == "truncated legacy pickle"
    torch.save(build_model({"channels": [2, 4]}).state_dict(), good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    bad = tmp_path / "model.pt"
    bad.write_bytes({"random bytes": rng.bytes(4096) if rng.bytes(1) != b"\x80" else b"\x00" * 4096,
                     "truncated zip": data[:len(data) // 2],
                     "flipped bytes": data[:len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:][:64])
                     + data[len(data) // 2 + 64:],
                     "truncated legacy pickle": data[:len(data) // 2],
                     "random after a pickle header": b"\x80\x02" + os.urandom(4096),
                     "empty": b""}[damage])
    spec = {"checkpoint": str(bad), "format": fmt, "allow_pickle": fmt == "full"}
    if fmt == "state_dict":
        spec["architecture"] = TINY
    with pytest.raises(ConfigError) as e:
        load_model(spec, where="tasks.mine.model")
    msg = str(e.value)
    assert msg.startswith(f"tasks.mine.model.checkpoint: {bad} is damaged or not a model file"), msg
    assert "allow_pickle" not in msg and "Python objects" not in msg


def test_an_intact_pickle_is_no_torchscript_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model({"channels": [2, 4]}).state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ConfigError, match=r"model\.format: \S+w\.pt is not a TorchScript file .*format: state_dict"):
        load_model({"checkpoint": str(path), "format": "torchscript"})


def test_spec_errors_name_the_key(tmp_path, monkeypatch):
    where = "tasks.mymodel.model"
    with pytest.raises(ConfigError, match=r"^tasks\.mymodel\.model\.checkpoint: file not found: .*nope\.pt"):
        load_model({"checkpoint": str(tmp_path / "nope.pt")}, where=where)
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    ck = str(tmp_path / "w.pt")
    cases = [
        ({"checkpoint": ck, "chekpoint": 1}, r"^tasks\.mymodel\.model: unknown keys \['chekpoint'\]"),
        ({"checkpoint": ck, "format": "onnx"}, r"\.format: must be one of"),
        ({"checkpoint": ck}, r"\.architecture: .* holds weights only"),
        ({"checkpoint": ck, "architecture": "DenseNet121"}, r"\.architecture\.name: expected 'monai:<Name>'"),
        ({"checkpoint": ck, "architecture": "no_such_pkg.nets:Net"}, r"cannot import module 'no_such_pkg\.nets'"),
        ({"checkpoint": ck, "architecture": "monai:DenseNet12"}, r"has no 'DenseNet12'; did you mean DenseNet121"),
        ({"checkpoint": ck, "architecture": {"name": "usernets:TinyNet", "kwargs": {"depth": 3}}},
         r"\.architecture\.kwargs: usernets:TinyNet\(depth=3\) failed"),
        ({"checkpoint": ck, "input": {"shape": [10, 10]}}, r"\.input\.shape: expected three positive integers"),
        ({"checkpoint": ck, "input": {"normalisation": "robust"}}, r"\.input\.normalisation: unknown .*zscore-brain"),
        ({"checkpoint": ck, "format": "torchscript", "architecture": TINY}, r"only used with format: state_dict"),
    ]
    for spec, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_model(spec, where=where)
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)  # as if MONAI were not installed
    with pytest.raises(ConfigError, match=r"needs MONAI.*pip install monai --no-deps.*brainfv\[monai\]"):
        load_model({"checkpoint": ck, "architecture": DENSENET}, where=where)


def test_check_model_input_against_the_cohort():
    net = densenet()
    info = {"input": {"shape": [16, 16, 16], "voxel_size": 2.0, "normalisation": "zscore-brain"},
            "classes": ["control", "patient"]}
    assert check_model_input(info, (16, 16, 16), 2.0, net) == (2,)
    with pytest.raises(ConfigError, match=r"expects input 16x16x16 \(m\.input\.shape\) but the cohort grid is "
                                          r"20x16x16 voxels of 2 mm"):
        check_model_input(info, (20, 16, 16), 2.0, where="m")
    with pytest.raises(ConfigError, match=r"expects 2 mm voxels .* but the cohort grid is 16x16x16 voxels of 3 mm"):
        check_model_input(info, (16, 16, 16), 3.0)
    with pytest.raises(ConfigError, match=r"expects intensities minmax .* the cohort provides zscore-brain"):
        check_model_input({"input": {"normalisation": "minmax"}}, (16, 16, 16), 2.0)
    # no stated grid: the probe pass is the check, and its failure is explained
    with pytest.raises(ConfigError, match=r"fails on an input of the cohort grid \(tensor 1x1x4x4x4.*smaller than "
                                          r"kernel size"):
        check_model_input({"checkpoint": "x.pt"}, (4, 4, 4), 2.0, net)
    with pytest.raises(ConfigError, match=r"3 classes .* output on the cohort grid has shape \(2,\)"):
        check_model_input({"classes": ["a", "b", "c"]}, (16, 16, 16), 2.0, net)
    net.train()
    check_model_input({}, (16, 16, 16), 2.0, net)
    assert net.training and all(m.training for m in net.modules())  # the probe left the modes as they were


# ------------------------------------------------------------------------------------------------------
# listing units
# ------------------------------------------------------------------------------------------------------

def test_describe_units_of_braincnn():
    model = build_model({"channels": [4, 8, 8]})
    model.train()
    before = model.block1.norm.running_mean.clone()
    rows = describe_units(model, (1,) + SHAPE)
    names = [r["layer"] for r in rows]
    blocks = [f"block{i}.{p}" for i in (1, 2, 3) for p in ("conv", "norm", "act", "drop", "pool")]
    assert names == blocks + ["gap", "dropout", "classifier"]  # blocks are containers: not listed
    by = {r["layer"]: r for r in rows}
    assert by["block2.conv"]["channels"] == 8 and by["block2.conv"]["output_shape"] == (8, 8, 8, 8)
    assert by["classifier"]["channels"] == 2 and not by["classifier"]["spatial"]
    assert by["classifier"]["rf_size"] is None and by["gap"]["rf_size"] is None
    for r in rows:
        rf = receptive_field(model, r["layer"], (1,) + SHAPE)
        expect = (tuple(a[0] for a in rf), tuple(a[1] for a in rf)) if rf and r["spatial"] else (None, None)
        assert (r["rf_size"], r["rf_stride"]) == expect, r["layer"]
    assert by["block2.pool"]["rf_size"] == (10, 10, 10) and by["block2.pool"]["rf_stride"] == (4, 4, 4)
    assert model.training and torch.equal(model.block1.norm.running_mean, before)  # no side effects


def test_describe_units_of_monai_networks_and_their_torchscript():
    net = densenet()
    rows = describe_units(net, (1,) + SHAPE)
    by = {r["layer"]: r for r in rows}
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv3d)}
    assert convs and all(by[n]["channels"] == m.out_channels and by[n]["type"] == "Conv3d" for n, m in convs.items())
    assert by["features.conv0"]["rf_size"] == (7, 7, 7) and by["features.conv0"]["rf_stride"] == (2, 2, 2)
    assert by["features.denseblock1.denselayer2"]["channels"] == 8 + 2 * 4  # a concatenation: its own tensor
    assert "features" not in by and "features.denseblock1" not in by  # containers passing a child's tensor on
    assert by["class_layers.out"]["output_shape"] == (2,)
    # the scripted network gives the same table through the compiled graph, but no receptive fields: whether
    # each module takes the previous one's output (a chain, not a branch) cannot be checked on the graph
    def no_rf(rs):
        return [{**r, "rf_size": None, "rf_stride": None} for r in rs]

    scripted = describe_units(torch.jit.script(net), (1,) + SHAPE)
    assert scripted == no_rf(rows) and all(r["rf_size"] is None for r in scripted)
    # ResNet: shared activation runs twice; the residual block's output is listed as its own
    res = _trained_like(monai_nets.ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 8], spatial_dims=3, n_input_channels=1,
                                          num_classes=2))
    rrows = describe_units(res, (1,) + SHAPE)
    rby = {r["layer"]: r for r in rrows}
    assert rby["layer1.0.act"]["calls"] == 2 and rby["layer2.0"]["channels"] == 8 and "maxpool" in rby
    # the skip ends the chain
    assert rby["layer1.0"]["rf_size"] is None and rby["layer1.0.conv2"]["rf_size"] is not None
    assert describe_units(torch.jit.script(res), (1,) + SHAPE) == no_rf(rrows)


def test_describe_units_of_traced_and_unreadable_torchscript(monkeypatch):
    model = build_model({"channels": [4, 8]}).eval()
    traced = torch.jit.trace(model, torch.zeros((1, 1) + SHAPE))
    rows = {r["layer"]: r for r in describe_units(traced, (1,) + SHAPE)}
    # shapes and channels come from the graph; a traced module keeps no kernel sizes, so no receptive field,
    # and a module that computes nothing (Identity) leaves no trace
    assert rows["block2.conv"]["output_shape"] == (8, 8, 8, 8) and rows["classifier"]["channels"] == 2
    assert rows["block2.conv"]["rf_size"] is None and "block1.drop" not in rows
    monkeypatch.setattr(TorchScriptModel, "_find_outputs", lambda self: 1 / 0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        listed = describe_units(traced, (1,) + SHAPE)
    assert any("cannot read its graph" in str(x.message) for x in w)
    assert [r["layer"] for r in listed][:2] == ["block1", "block1.conv"]
    assert all(r["output_shape"] is None for r in listed)


def test_resolve_units_against_the_real_channel_count():
    net = densenet()
    shape = (1,) + SHAPE
    assert resolve_units(net, "features.conv0", "all", shape) == list(range(8))
    assert resolve_units(net, "features.conv0", 3, shape) == [0, 1, 2]
    assert resolve_units(net, "features.conv0", 100, shape) == list(range(8))  # as brainfv.models.arch: clipped
    assert resolve_units(torch.jit.script(net), "features.conv0", [7, 2], shape) == [2, 7]  # ascending
    with pytest.raises(UnitError, match=r"layer 'features\.conv0' has 8 channels \(0\.\.7\); channels \[8\]"):
        resolve_units(net, "features.conv0", [1, 8], shape)
    with pytest.raises(UnitError, match=r"'features\.conv0'.*must be 'all'"):
        resolve_units(net, "features.conv0", "some", shape)
    with pytest.raises(UnitError, match=r"layer 'feature\.conv0' is not in the model"):
        resolve_units(net, "feature.conv0", "all", shape)


def test_describe_job_needs_the_output_order_and_known_layers(tmp_path):
    """A given model must name its outputs (else a male logit could be read as female), and every layer the
    config asks for must exist: both fail in describe_model, before any visualization, naming the keys."""
    import nibabel as nib
    import pandas as pd

    from brainfv.jobs.base import Job
    from brainfv.jobs.models import describe_job

    torch.save(densenet().state_dict(), tmp_path / "dn.pt")
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    reference.to_filename(tmp_path / "reference.nii.gz")
    pd.DataFrame({"subject": ["a", "b", "c", "d"], "sex": ["F", "M", "F", "M"], "split": ["train"] * 4,
                  "index": range(4)}).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)

    def job(spec, layers):
        return Job(input={"model": str(tmp_path / "dn.pt"), "participants": str(tmp_path / "participants.tsv"),
                          "reference": str(tmp_path / "reference.nii.gz")},
                   output={"info": str(tmp_path / "model.json"), "units": str(tmp_path / "units.tsv")},
                   params={"task": "sex", "target": "sex", "model": {"format": "state_dict", "architecture": DENSENET,
                                                                      **spec},
                           "model_key": "tasks.sex.model"}, log=lambda m: None,
                   config={"featviz": {"layers": [{"layer": layer} if isinstance(layer, str) else
                                                  {"layer": layer[0], "units": layer[1]} for layer in layers]}})

    with pytest.raises(ConfigError, match=r"tasks\.sex\.model\.classes: not given.*\['F', 'M'\]"):
        describe_job(job({}, ["features.denseblock1"]))
    with pytest.raises(ConfigError, match=r"featviz\.layers: \['features\.nope'\] are not layers of tasks\.sex\.model"):
        describe_job(job({"classes": ["F", "M"]}, ["features.denseblock1", "features.nope"]))
    assert not (tmp_path / "units.tsv").exists()
    with pytest.raises(ConfigError, match=r"featviz\.layers\[class_layers\.out\]\.units \(layer 'class_layers\.out' "
                                          r"of tasks\.sex\.model has 2 units\): channels \[5\] out of range 0\.\.1"):
        describe_job(job({"classes": ["F", "M"]}, ["features.denseblock1", ("class_layers.out", [0, 5])]))
    describe_job(job({"classes": ["F", "M"]}, ["features.denseblock1", "class_layers.out"]))
    assert (tmp_path / "units.tsv").exists() and (tmp_path / "model.json").exists()
