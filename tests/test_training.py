import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import toy_dataset

from brainfv.errors import InputDataError
from brainfv.models import build_model, load_checkpoint
from brainfv.models.arch import layer_units
from brainfv.training import binary_metrics, train_task

FAST = {"epochs": 6, "batch_size": 4, "lr": 3e-3, "patience": 50, "augment": {"shift_vox": 0, "intensity": 0}}
ARCH = {"channels": [4, 8], "dropout": 0.0}


def test_model_shapes_and_layer_names():
    m = build_model({"channels": [8, 16, 32, 64]})
    names = dict(m.named_modules())
    for layer in layer_units({"channels": [8, 16, 32, 64]}):
        assert layer in names, layer
    assert m(torch.zeros(2, 1, 52, 64, 52)).shape == (2, 2)
    assert layer_units({"channels": [8, 16]})["block2.conv"] == 16
    assert build_model({"hidden": 100}).fc.out_features == 100


def test_toy_set_is_learned(tmp_path):
    root = toy_dataset(tmp_path / "toy", n=24)
    m = train_task(root, "toy", "label", ARCH, FAST, 0, tmp_path / "out", tmp_path / "ck")
    hist = pd.read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert m["test"]["accuracy"] == 1.0 and m["test"]["balanced_accuracy"] == 1.0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["test"]["confusion_matrix"] == m["test"]["confusion_matrix"]
    pred = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert len(pred) == m["test"]["n"] and (pred["label"] == pred["predicted"]).all()


def test_checkpoint_roundtrip(tmp_path):
    root = toy_dataset(tmp_path / "toy", n=16)
    train_task(root, "toy", "label", ARCH, {**FAST, "epochs": 1}, 0, tmp_path / "out", tmp_path / "ck")
    model, meta = load_checkpoint(tmp_path / "out" / "model.pt")
    model2, _ = load_checkpoint(tmp_path / "out" / "model.pt")
    x = torch.randn(3, 1, 12, 14, 12)
    assert torch.equal(model(x), model2(x))
    assert meta["classes"] == ["A", "B"] and meta["grid"]["shape"] == [12, 14, 12]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    root = toy_dataset(tmp_path / "toy", n=16, separable=False)
    tr = {**FAST, "epochs": 4, "augment": {"shift_vox": 1, "intensity": 0.1}}
    arch = {**ARCH, "dropout": 0.3}
    full = train_task(root, "toy", "label", arch, tr, 3, tmp_path / "a", tmp_path / "cka")
    assert train_task(root, "toy", "label", arch, tr, 3, tmp_path / "b", tmp_path / "ckb", stop_after_epoch=2) is None
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = train_task(root, "toy", "label", arch, tr, 3, tmp_path / "b", tmp_path / "ckb")
    ha = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t")
    hb = pd.read_csv(tmp_path / "b" / "history.tsv", sep="\t")
    assert np.allclose(ha["train_loss"], hb["train_loss"]) and np.allclose(ha["val_loss"], hb["val_loss"])
    ma, _ = load_checkpoint(tmp_path / "a" / "model.pt")
    mb, _ = load_checkpoint(tmp_path / "b" / "model.pt")
    for (k, a), (_, b) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(a, b), k
    assert full["test"] == resumed["test"]


def test_bad_training_inputs(tmp_path):
    root = toy_dataset(tmp_path / "toy", n=16)
    with pytest.raises(InputDataError, match="target column 'age' not in participants"):
        train_task(root, "toy", "age", ARCH, FAST, 0, tmp_path / "o", tmp_path / "c")
    parts = pd.read_csv(root / "participants.tsv", sep="\t")
    one = parts.copy()
    one.loc[one["split"] == "train", "label"] = "A"
    one.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputDataError, match="training split has 1 class"):
        train_task(root, "toy", "label", ARCH, FAST, 0, tmp_path / "o", tmp_path / "c")
    empty = parts.copy()
    empty.loc[empty["split"] == "val", "split"] = "train"
    empty.to_csv(root / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputDataError, match="val split is empty"):
        train_task(root, "toy", "label", ARCH, FAST, 0, tmp_path / "o", tmp_path / "c")
    parts.to_csv(root / "participants.tsv", sep="\t", index=False)
    np.save(root / "volumes.npy", np.zeros((16, 10, 10, 10), np.float32))
    with pytest.raises(InputDataError, match="do not match the grid"):
        train_task(root, "toy", "label", ARCH, FAST, 0, tmp_path / "o", tmp_path / "c")


def test_metrics():
    m = binary_metrics([0, 0, 1, 1], np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]]), 2)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == 0.75 and m["roc_auc"] == 1.0
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]


def test_new_data_retrains_from_scratch(tmp_path):
    """A checkpoint left by a run on other data is never resumed: the epochs run again on the new data."""
    tr = {**FAST, "epochs": 3}
    old = toy_dataset(tmp_path / "toy", n=16, seed=0)
    assert train_task(old, "toy", "label", ARCH, tr, 0, tmp_path / "o", tmp_path / "ck", stop_after_epoch=2) is None
    assert (tmp_path / "ck" / "last.pt").exists()
    toy_dataset(tmp_path / "toy", n=16, seed=1)  # the same folder, new content (as after a config change)
    lines = []
    m = train_task(old, "toy", "label", ARCH, tr, 0, tmp_path / "o", tmp_path / "ck", log=lines.append)
    hist = pd.read_csv(tmp_path / "o" / "history.tsv", sep="\t")
    assert list(hist["epoch"]) == [1, 2, 3] and m["epochs_run"] == 3
    assert any("other data" in line for line in lines) and not any("resuming" in line for line in lines)
    fresh = train_task(toy_dataset(tmp_path / "fresh", n=16, seed=1), "toy", "label", ARCH, tr, 0, tmp_path / "f",
                       tmp_path / "ckf")
    a, _ = load_checkpoint(tmp_path / "o" / "model.pt")
    b, _ = load_checkpoint(tmp_path / "f" / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert fresh["test"] == m["test"]


def test_finished_run_leaves_no_checkpoint(tmp_path):
    root = toy_dataset(tmp_path / "toy", n=16)
    train_task(root, "toy", "label", ARCH, {**FAST, "epochs": 2}, 0, tmp_path / "o", tmp_path / "ck")
    assert not (tmp_path / "ck" / "last.pt").exists()


def test_volume_dataset_takes_augmentation_as_a_dict(tmp_path):
    """The library accepts the config's plain dict (as benchmarks/training.py passes it); unset fields come
    from the schema, and a misspelt one is named."""
    from brainfv.config import AugmentConfig
    from brainfv.data.store import VolumeWriter
    from brainfv.errors import ConfigError
    from brainfv.training import VolumeDataset

    with VolumeWriter(tmp_path / "v.npy", 2, (8, 8, 8)) as w:
        for i in range(2):
            w.append(np.full((8, 8, 8), float(i), np.float32))
    ds = VolumeDataset(tmp_path / "v.npy", [0, 1], [0, 1], {"shift_vox": 1, "intensity": 0.1}, seed=0)
    assert isinstance(ds.augment, AugmentConfig) and ds.augment.shift_vox == 1
    x, y = ds[1]
    assert tuple(x.shape) == (1, 8, 8, 8) and int(y) == 1
    with pytest.raises(ConfigError, match="shift_vx"):
        VolumeDataset(tmp_path / "v.npy", [0], [0], {"shift_vx": 1})


def test_metrics_agree_with_a_hand_count():
    """scikit-learn's metrics, read as before: recall averaged over the classes present, AUC as the share of
    (positive, negative) pairs ranked right with ties counted half, one-vs-rest over classes with both."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    y[y == 2] = 1                                    # class 2 absent from the labels
    p = rng.dirichlet([1, 1, 1], 40)
    p[:5] = [0.2, 0.4, 0.4]                          # ties
    m = binary_metrics(y, p, 3)
    pred = p.argmax(1)
    recalls = [(pred[y == c] == c).mean() for c in (0, 1)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    aucs = []
    for c in (0, 1):                                 # class 2 has no positives: left out
        d = p[y == c, c][:, None] - p[y != c, c][None, :]
        aucs.append(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)
    assert m["roc_auc"] == pytest.approx(np.mean(aucs))
    assert m["n_per_class"] == [int((y == 0).sum()), int((y == 1).sum()), 0]
    assert np.isnan(binary_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), 2)["roc_auc"])


def test_flatten_head_is_position_specific():
    """head: flatten (the authors' FC 100 -> ELU -> classes on the flattened last maps): the classifier's logit
    depends on where a pattern sits; the pooled head is (nearly) blind to it. Layers and receptive fields."""
    import torch

    from brainfv.featviz.units import describe_units
    from brainfv.models.arch import layer_units

    arch = {"channels": [4, 8], "head": "flatten", "hidden": 100, "activation": "elu", "dropout": 0.5}
    torch.manual_seed(0)
    m = build_model(arch, input_shape=(24, 24, 24)).eval()
    assert m.fc.in_features == 8 * 6 * 6 * 6 and m.fc.out_features == 100
    assert isinstance(m.fc_act, torch.nn.ELU)
    blocks = {f"block{i}.{p}": c for i, c in ((1, 4), (2, 8)) for p in ("conv", "norm", "act", "pool")}
    assert layer_units(arch) == {**blocks, "fc": 100, "fc_act": 100, "classifier": 2}
    # a blob moved by a multiple of the pooling stride, clear of the borders: the pooled head sees the same maps
    blob = torch.zeros(1, 1, 24, 24, 24)
    blob[..., 4:8, 4:8, 4:8] = 1
    moved = torch.roll(blob, shifts=(12, 8, 12), dims=(2, 3, 4))
    torch.manual_seed(0)
    pooled = build_model({"channels": [4, 8]}).eval()
    with torch.no_grad():
        flat = (m(blob) - m(moved)).abs().max().item()
        pool = (pooled(blob) - pooled(moved)).abs().max().item()
    assert pool < 1e-5 and flat > 1e-3
    with pytest.raises(Exception, match="input grid's shape"):
        build_model(arch)
    # a saved flatten model reloads with its grid
    import tempfile
    from pathlib import Path

    from brainfv.models import save_checkpoint
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / "m.pt", m, classes=["a", "b"])
        again, _ = load_checkpoint(Path(d) / "m.pt")
        with torch.no_grad():
            assert torch.equal(again(blob), m(blob))
    # every unit of fc and the classifier sees the whole grid
    info = {r["layer"]: r for r in describe_units(m, (1, 24, 24, 24))}
    assert info["block2.pool"]["output_shape"] == (8, 6, 6, 6) and info["block2.pool"]["rf_size"] is not None
    assert info["fc"]["output_shape"] == (100,) and not info["fc"]["spatial"] and info["fc"]["rf_size"] is None
    assert info["classifier"]["output_shape"] == (2,)


def test_patience_counts_epochs_without_a_bacc_or_loss_gain():
    from brainfv.training import epochs_without_gain

    assert epochs_without_gain(3, True, 0.9, 0.5) == 0     # better balanced accuracy
    assert epochs_without_gain(3, False, 0.4, 0.5) == 0    # tied accuracy, lower loss: still learning
    assert epochs_without_gain(3, False, 0.5, 0.5) == 4    # neither
