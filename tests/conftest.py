import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

torch.set_num_threads(2)

from brainfv.data.grid import Grid  # noqa: E402


def toy_dataset(root, n=24, shape=(12, 14, 12), seed=0, separable=True, splits=(0.5, 0.25, 0.25)):
    """A small dataset folder: class 'B' subjects have a bright cube, 'A' subjects do not."""
    import pandas as pd

    from brainfv.data.cohort import assign_splits
    from brainfv.data.store import VolumeWriter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    grid = Grid(shape=shape, voxel_size=8.0, origin=(-40.0, -50.0, -40.0))
    rng = np.random.default_rng(seed)
    labels = np.array(["A", "B"] * (n // 2))
    rows = []
    with VolumeWriter(root / "volumes.npy", n, shape) as w:
        for i in range(n):
            v = rng.normal(0, 1, shape).astype(np.float32)
            if separable and labels[i] == "B":
                v[4:8, 5:9, 4:8] += 4.0
            w.append(v)
            rows.append({"subject": f"t{i:02d}", "label": labels[i], "sex": labels[i], "index": i,
                         "cohort": "toy"})
    df = pd.DataFrame(rows)
    df["split"] = assign_splits(df["label"], dict(zip(("train", "val", "test"), splits)), seed)
    df.to_csv(root / "participants.tsv", sep="\t", index=False)
    grid.to_nifti(np.zeros(shape, np.float32)).to_filename(root / "reference.nii.gz")
    grid.to_nifti(np.ones(shape, np.uint8), dtype=np.uint8).to_filename(root / "mask.nii.gz")
    from brainfv.data.store import write_manifest

    write_manifest(root, files=["reference.nii.gz", "mask.nii.gz"])
    return root


@pytest.fixture
def toy(tmp_path):
    return toy_dataset(tmp_path / "toy")


def small_config(**over):
    """A full config (schema defaults applied by brainfv.config) for a fast 8 mm grid."""
    from brainfv.config import check, complete

    cfg = {"grid": {"voxel_size": 8.0}, "cohort": {"synthetic": {"n_subjects": 12}}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return check(complete(cfg))


def small_model(seed=0):
    """A small study CNN (4/8/8 channels) with non-trivial BatchNorm statistics, as in a trained model."""
    import torch
    from torch import nn

    from brainfv.models import build_model

    torch.manual_seed(seed)
    m = build_model({"channels": [4, 8, 8]})
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm3d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()
