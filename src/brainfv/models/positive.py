"""Positive-control networks: the study's architecture with weights set by hand, so the preferred input is known.

Activation maximization can only show what a network encodes; to know how much of a known pattern a
regularization preset recovers (its fidelity ceiling), the study visualises networks built so that their
preferred input is known by construction:

- block 1's first channel correlates the input with a dark-lesion template (a zero-mean, unit-norm kernel: a
  dark ball of the lesions' diameter inside a brighter shell; block 1's kernel is widened to hold it);
- every later block passes that channel on (a centre tap of 1; BatchNorm set to the identity), so the last
  feature maps hold max-pooled template responses; every other weight is 0;
- the 'present' logit reads that channel: averaged over all positions (``head: pool``: dark lesions anywhere,
  as many as fit) or at chosen positions of the last maps (``head: flatten``: dark lesions inside those
  positions' receptive fields, the known *where*; :func:`lesion_positions` picks the cells where lesions were
  planted most often).

With a hidden FC layer, its first unit carries the same sum. The 'absent' logit is constant (weight 0).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ..data.store import Dataset
from ..errors import ConfigError
from ..utils import atomic_path, get_logger
from .cnn import build_model, flatten_shape, save_checkpoint

__all__ = ["lesion_template_kernel", "lesion_positions", "positive_control_network", "known_pattern",
           "construct_positive_control"]


def lesion_template_kernel(diameter_vox: float, size: int | None = None) -> np.ndarray:
    """A zero-mean, unit-L2 kernel of odd side ``size`` (default: the ball plus a 1.5-voxel shell): -1 in a
    ball of ``diameter_vox``, +1 in the shell around it, balanced so a flat image scores 0."""
    r_in = diameter_vox / 2
    size = size or int(2 * np.ceil(r_in + 1.5) + 1)
    if size % 2 == 0:
        size += 1
    ax = np.arange(size) - (size - 1) / 2
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(ax, ax, ax, indexing="ij")))
    inner, shell = r <= r_in, (r > r_in) & (r <= r_in + 1.5)
    if not inner.any() or not shell.any():
        raise ConfigError(f"a lesion template of {diameter_vox} voxels does not fit a {size}-voxel kernel")
    k = np.zeros((size,) * 3)
    k[inner] = -1.0 / inner.sum()
    k[shell] = 1.0 / shell.sum()
    return (k / np.linalg.norm(k)).astype(np.float32)


def lesion_positions(frequency: np.ndarray, n_blocks: int, k: int = 2) -> list[tuple[int, int, int]]:
    """The ``k`` cells of the last feature maps (each block halves the grid) whose input region holds the
    largest share of planted lesions (``frequency``: the dataset's lesion frequency map), most frequent first."""
    f = np.asarray(frequency, np.float64)
    fs = flatten_shape(f.shape, n_blocks)
    step = 2 ** n_blocks
    cells = f[:fs[0] * step, :fs[1] * step, :fs[2] * step].reshape(fs[0], step, fs[1], step, fs[2], step).sum((1, 3, 5))
    if cells.max() <= 0:
        raise ConfigError("positive control: the lesion frequency map is empty (no lesions were planted)")
    order = np.argsort(cells, axis=None)[::-1][:k]
    return [tuple(int(i) for i in np.unravel_index(o, fs)) for o in order if cells.flat[o] > 0]


def positive_control_network(arch: dict, input_shape: tuple, diameter_vox: float, positions: list | None = None,
                             n_classes: int = 2, present: int = 1) -> torch.nn.Module:
    """The positive-control network of architecture ``arch`` (config ``model`` keys, ``head`` included) for a
    lesion template of ``diameter_vox``; ``positions`` (cells of the last maps) for the flatten head."""
    a = dict(arch)
    if a.get("norm", "batch") == "instance":
        raise ConfigError("positive control: model.norm instance rescales every map; use batch or none")
    n_blocks = len(a.get("channels", build_model().arch["channels"]))
    kernel = lesion_template_kernel(diameter_vox)
    a["kernel_size"] = [kernel.shape[0]] + [3] * (n_blocks - 1)
    model = build_model(a, n_classes=n_classes, input_shape=input_shape)
    head = model.head
    if head == "flatten" and not positions:
        raise ConfigError("positive control with head flatten: give the positions of the last maps it reads")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
                m.weight.fill_(1.0)
        model.block1.conv.weight[0, 0] = torch.from_numpy(kernel)
        for i in range(2, n_blocks + 1):
            model.get_submodule(f"block{i}.conv").weight[0, 0, 1, 1, 1] = 1.0
        if head == "pool":
            read = {0: 1.0}
        else:
            c = model.get_submodule(f"block{n_blocks}.conv").out_channels
            read = {int(np.ravel_multi_index((0,) + tuple(p), (c,) + model.feature_shape)): 1.0 / len(positions)
                    for p in positions}
        first = model.fc if hasattr(model, "fc") else model.classifier
        row = 0 if hasattr(model, "fc") else present
        for idx, w in read.items():
            first.weight[row, idx] = w
        if hasattr(model, "fc"):
            model.classifier.weight[present, 0] = 1.0
    return model.eval()


def known_pattern(shape: tuple, diameter_vox: float, positions: list | None = None, n_blocks: int = 4) -> np.ndarray:
    """Where the positive control's preferred dark lesions may lie: 1 inside the input region of the read
    cells (flatten head), everywhere for the pooled head (``positions`` None)."""
    out = np.zeros(tuple(shape), np.float32)
    if positions is None:
        out[:] = 1
        return out
    step = 2 ** n_blocks
    for p in positions:
        out[tuple(slice(c * step, (c + 1) * step) for c in p)] = 1
    return out


def construct_positive_control(dataset_dir: str | Path, arch: dict, task: str, target: str, out_dir: str | Path,
                               cells: int = 2, log: Callable | None = None) -> dict:
    """Build ``task``'s positive-control network for a lesion dataset folder and write ``model.pt`` (a brainfv
    checkpoint) and ``metrics.json`` (its target, classes and output layer, and how it was built) to ``out_dir``.

    The template's diameter is the median planted lesion diameter (``lesions.tsv``), in voxels of the grid;
    the flatten head reads the ``cells`` cells of the last maps where lesions were planted most often
    (``lesion_frequency.nii.gz``)."""
    log = log or get_logger().info
    ds = Dataset(dataset_dir)
    root = Path(dataset_dir)
    lesions = pd.read_csv(root / "lesions.tsv", sep="\t")
    if target != "lesion" or not len(lesions):
        raise ConfigError(f"tasks.{task}.positive_control: needs the lesion dataset with planted lesions and "
                          f"target 'lesion' (got target {target!r}, {len(lesions)} lesions)")
    classes = sorted(ds.participants[target].astype(str).unique())
    if classes != ["absent", "present"]:
        raise ConfigError(f"tasks.{task}.positive_control: needs presence labelling (classes absent/present); "
                          f"got {classes} (lesions.labelling)")
    diameter = float(lesions["diameter_mm"].median()) / ds.grid.voxel_size
    n_blocks = len(arch["channels"])
    head = arch.get("head", "pool")
    positions = None
    if head == "flatten":
        freq = np.asarray(nib.load(root / "lesion_frequency.nii.gz").dataobj, np.float32)
        positions = lesion_positions(freq, n_blocks, cells)
    model = positive_control_network(arch, ds.grid.shape, diameter, positions, n_classes=2,
                                     present=classes.index("present"))
    how = {"template_diameter_vox": round(diameter, 3), "head": head,
           "cells": [list(p) for p in positions] if positions else None,
           "cell_size_vox": 2 ** n_blocks}
    meta = {"task": task, "target": target, "classes": classes, "role": "positive control",
            "grid": {"shape": list(ds.grid.shape), "voxel_size": ds.grid.voxel_size, "origin": list(ds.grid.origin)},
            "normalisation": "z-score within brain mask", "dataset": str(dataset_dir), "output_layer": "classifier",
            "construction": how}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", model, **meta)
    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    log(f"task {task}: positive-control network ({head} head), dark-lesion template of {diameter:.1f} voxels"
        + (f", read at cells {how['cells']} ({how['cell_size_vox']} voxels a side)" if positions else ""))
    return meta
