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

The sex task (target ``sex``) has a flatten-head control (:func:`sex_control_network`) whose 'M' logit prefers
the planted regional M−F effect map (the dataset's ``sex_effect_regional``, what ``effect_corr`` scores) at the
resolution of the last feature maps:

- block 1 passes the intensity on in two channels, ``x`` and ``−x``, each lifted by :data:`SEX_OFFSET` so that
  no activation on the way clips it; later blocks pass both on, so the last maps hold ``B + max`` and ``B − min``
  of the intensity over each cell's input window (``2**n_blocks`` voxels a side);
- the 'M' logit reads cell ``c`` with the effect map's mean ``w_c`` there, always through a weight ≤ 0: a bright
  cell (``w_c > 0``) through ``−(B − min)``, a dark one through ``−(B + max)``. Read with a positive weight, a
  max-pooled value rewards one voxel per window and leaves the rest of the cell free (no gradient, no known
  optimum); read negatively, its min (max) lifts (lowers) *every* voxel of the cell. The logit,
  ``Σ_{w>0} w·min_c x + Σ_{w<0} w·max_c x``, is concave, and its maximum over a bounded image range is known:
  every voxel of a positive cell at the top of the range, of a negative cell at the bottom
  (:func:`sex_known_pattern`); the 'F' logit is the same with −w (its own concave readout: the negative of 'M'
  would again reward single voxels). With a hidden FC layer, unit 0 carries 'M' and unit 1 'F', lifted so that
  their activation is the identity.

There is no pooled-head sex control: a pooled head reads every position alike, so its optimum is a uniform
image (all at the top of the range, or all at the bottom), which no preset can fail to find and which says
nothing about *where*.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ..data.files import KNOWN_FILE
from ..data.store import Dataset
from ..errors import ConfigError
from ..utils import atomic_path, get_logger
from .cnn import build_model, flatten_shape, save_checkpoint

__all__ = ["narrowed", "lesion_template_kernel", "lesion_positions", "positive_control_network", "known_pattern",
           "sex_cell_weights", "sex_control_network", "sex_known_pattern", "construct_positive_control",
           "KNOWN_FILE"]


def lesion_template_kernel(diameter_vox: float, size: int | None = None) -> np.ndarray:
    """A zero-mean, unit-L2 kernel of odd side ``size`` (default: the ball plus a 1.5-voxel shell): -1 in a
    ball of ``diameter_vox``, +1 in the shell around it, balanced so a flat image scores 0."""
    r_in = diameter_vox / 2
    # the smallest odd side holding every voxel within r_in + 1.5 of the centre (a wider kernel only adds zero taps:
    # 11 instead of 9 voxels for the laptop's 5-voxel lesions cost 1.8x the work of the widest convolution)
    size = size or int(2 * np.floor(r_in + 1.5) + 1)
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


def _cell_view(a: np.ndarray, n_blocks: int) -> np.ndarray:
    """``a`` (X, Y, Z) as cells of the last feature maps: (cx, s, cy, s, cz, s) with ``s = 2**n_blocks``, the
    voxels past the last whole cell dropped (they are never read)."""
    fs = flatten_shape(a.shape, n_blocks)
    s = 2 ** n_blocks
    return a[:fs[0] * s, :fs[1] * s, :fs[2] * s].reshape(fs[0], s, fs[1], s, fs[2], s)


def _cells_to_voxels(cells: np.ndarray, shape: tuple, n_blocks: int, fill: float = 0) -> np.ndarray:
    """A value per cell spread over the cell's voxels, on a grid of ``shape`` (``fill`` past the last cell)."""
    s = 2 ** n_blocks
    out = np.full(tuple(shape), fill, np.asarray(cells).dtype)
    up = np.asarray(cells).repeat(s, 0).repeat(s, 1).repeat(s, 2)
    out[:up.shape[0], :up.shape[1], :up.shape[2]] = up
    return out


def lesion_positions(frequency: np.ndarray, n_blocks: int, k: int = 2) -> list[tuple[int, int, int]]:
    """The ``k`` cells of the last feature maps (each block halves the grid) whose input region holds the
    largest share of planted lesions (``frequency``: the dataset's lesion frequency map), most frequent first."""
    cells = _cell_view(np.asarray(frequency, np.float64), n_blocks).sum((1, 3, 5))
    fs = cells.shape
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
        _identity_blocks(model)
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


def narrowed(arch: dict, channels: int) -> dict:
    """``arch`` with ``channels`` channels in every block: a positive control uses one channel (the lesion
    template's response) or two (the sex control's x and −x) and sets every other weight to 0, so the channels it
    does not use compute zeros; without them it is the same function — the same preferred input, the same
    gradients — at a fraction of the cost (the lesion template's kernel is 9 voxels wide on the 4 mm grid:
    with the study's 8 channels one optimisation step took 3.6 s for 16 images)."""
    return {**arch, "channels": [int(channels)] * len(arch.get("channels", build_model().arch["channels"]))}


def _identity_blocks(model: torch.nn.Module) -> None:
    """Every weight and bias 0, every BatchNorm the identity (eval mode)."""
    for p in model.parameters():
        p.zero_()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0 - m.eps)
            m.weight.fill_(1.0)


#: the offset that keeps both pass-through channels positive, so every ReLU/ELU/GELU on their way is the identity
#: (z-scored images never come near it; an image beyond it would be clipped, not misread)
SEX_OFFSET = 100.0


def sex_cell_weights(effect: np.ndarray, n_blocks: int) -> np.ndarray:
    """The M−F ``effect`` map averaged over each cell of the last feature maps (its input window: ``2**n_blocks``
    voxels a side; voxels past the last whole cell are never read), scaled so the absolute weights sum to 1."""
    w = _cell_view(np.nan_to_num(np.asarray(effect, np.float64)), n_blocks).mean((1, 3, 5))
    if not np.abs(w).sum() > 0:
        raise ConfigError("positive control: the sex effect map is zero on every cell of the last feature maps")
    return (w / np.abs(w).sum()).astype(np.float32)


def sex_known_pattern(shape: tuple, weights: np.ndarray, n_blocks: int) -> np.ndarray:
    """The sex control's preferred input for its 'M' logit, up to the image range: +1 (the range's top) on every
    cell whose weight is positive, −1 (its bottom) where it is negative, 0 where the network reads nothing
    (zero weight, or past the last whole cell). Its 'F' logit prefers the negative."""
    return _cells_to_voxels(np.sign(np.asarray(weights, np.float32)), shape, n_blocks)


def _sex_readout(weights: torch.Tensor, n_cells: int) -> torch.Tensor:
    """The row over the flattened last maps (channel 0: B + max of the cell, channel 1: B − min) that scores
    ``Σ_{w>0} w·min + Σ_{w<0} w·max`` (less a constant): both parts are read with a weight ≤ 0."""
    row = torch.zeros(2 * n_cells)
    row[:n_cells] = torch.where(weights < 0, weights, torch.zeros(()))
    row[n_cells:] = torch.where(weights > 0, -weights, torch.zeros(()))
    return row


def sex_control_network(arch: dict, input_shape: tuple, weights: np.ndarray, n_classes: int = 2,
                        male: int = 1) -> torch.nn.Module:
    """The flatten-head sex control of architecture ``arch`` whose 'M' logit (class ``male``) is
    ``Σ_{w>0} w·min_cell(x) + Σ_{w<0} w·max_cell(x)`` (+ a constant) for the cell ``weights`` of
    :func:`sex_cell_weights`, and whose other logit is the same with −w: a concave function of the image whose
    maximum over a bounded range is :func:`sex_known_pattern` (every voxel of a positive cell at the top of the
    range, of a negative cell at the bottom)."""
    a = dict(arch)
    if a.get("norm", "batch") == "instance":
        raise ConfigError("positive control: model.norm instance rescales every map; use batch or none")
    if a.get("head", "pool") != "flatten":
        raise ConfigError("positive control for target sex: only with model.head flatten (a pooled head's "
                          "preferred input is a uniform image; see brainfv.models.positive)")
    model = build_model(a, n_classes=n_classes, input_shape=input_shape)
    if min(model.arch["channels"]) < 2:
        raise ConfigError("positive control for target sex: needs 2 channels in every block (model.channels)")
    w = torch.as_tensor(np.asarray(weights, np.float32)).flatten()
    n_cells = int(np.prod(model.feature_shape))
    if w.numel() != n_cells:
        raise ConfigError(f"positive control: {w.numel()} cell weights for last maps of {model.feature_shape}")
    with torch.no_grad():
        _identity_blocks(model)
        k = model.block1.conv.kernel_size[0] // 2
        model.block1.conv.weight[0, 0, k, k, k] = 1.0   # channel 0: the intensity, channel 1: its negative,
        model.block1.conv.weight[1, 0, k, k, k] = -1.0  # both lifted by the offset
        lift = model.block1.norm.bias if isinstance(model.block1.norm, torch.nn.BatchNorm3d) else model.block1.conv.bias
        lift[:2] = SEX_OFFSET
        for i in range(2, model.n_blocks + 1):
            conv = model.get_submodule(f"block{i}.conv")
            k = conv.kernel_size[0] // 2  # the centre tap
            conv.weight[0, 0, k, k, k] = conv.weight[1, 1, k, k, k] = 1.0
        readouts = [(male, _sex_readout(w, n_cells)), (1 - male, _sex_readout(-w, n_cells))]
        if not hasattr(model, "fc"):
            for cls, row in readouts:
                model.classifier.weight[cls, :2 * n_cells] = row
        for unit, (cls, row) in enumerate(readouts[:model.fc.out_features] if hasattr(model, "fc") else []):
            model.fc.weight[unit, :2 * n_cells] = row  # one hidden unit per logit ('F' constant with one unit),
            model.fc.bias[unit] = 2 * SEX_OFFSET         # kept positive: its activation is the identity
            model.classifier.weight[cls, unit] = 1.0
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
    """Build ``task``'s positive-control network for a dataset folder and write ``model.pt`` (a brainfv
    checkpoint) and ``metrics.json`` (its target, classes and output layer, and how it was built) to ``out_dir``:
    target ``lesion`` (the lesion dataset, :func:`positive_control_network`) or ``sex`` (flatten head,
    :func:`sex_control_network`, from ``sex_effect_regional.nii.gz``)."""
    log = log or get_logger().info
    ds = Dataset(dataset_dir)
    if target not in ("lesion", "sex"):
        raise ConfigError(f"tasks.{task}.positive_control: no positive control is built for target {target!r} "
                          "(targets lesion and sex have one)")
    classes = sorted(ds.participants[target].astype(str).unique())
    build = _lesion_control if target == "lesion" else _sex_control
    model, how, said, known = build(ds, Path(dataset_dir), arch, task, classes, cells)
    # fp32: visualised in bf16 the sex control's x + SEX_OFFSET would lose x (its recovery test: correlation 0.63
    # instead of > 0.9); read by the visualize job (jobs.featviz.request_precision)
    meta = {"task": task, "target": target, "classes": classes, "role": "positive control", "precision": "fp32",
            "grid": {"shape": list(ds.grid.shape), "voxel_size": ds.grid.voxel_size, "origin": list(ds.grid.origin)},
            "normalisation": "z-score within brain mask", "dataset": str(dataset_dir), "output_layer": "classifier",
            "construction": how}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", model, **meta)
    with atomic_path(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    with atomic_path(out / KNOWN_FILE) as tmp:  # X × Y × Z × classes, NaN: no single known optimum
        nib.save(nib.Nifti1Image(np.moveaxis(known, 0, -1).astype(np.float32), ds.grid.affine), tmp)
    log(f"task {task}: positive-control network ({how['head']} head), {said}")
    return meta


def _lesion_control(ds: Dataset, root: Path, arch: dict, task: str, classes: list, cells: int) -> tuple:
    """The lesion control: the template's diameter is the median planted lesion diameter (``lesions.tsv``), in
    voxels of the grid; the flatten head reads the ``cells`` cells of the last maps where lesions were planted
    most often (``lesion_frequency.nii.gz``)."""
    lesions = pd.read_csv(root / "lesions.tsv", sep="\t") if (root / "lesions.tsv").exists() else pd.DataFrame()
    if not len(lesions):
        raise ConfigError(f"tasks.{task}.positive_control: target 'lesion' needs the lesion dataset with planted "
                          f"lesions (got {len(lesions)} lesions in {root})")
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
    model = positive_control_network(narrowed(arch, 1), ds.grid.shape, diameter, positions, n_classes=2,
                                     present=classes.index("present"))
    how = {"template_diameter_vox": round(diameter, 3), "head": head,
           "cells": [list(p) for p in positions] if positions else None,
           "cell_size_vox": 2 ** n_blocks}
    said = f"dark-lesion template of {diameter:.1f} voxels" + (
        f", read at cells {how['cells']} ({how['cell_size_vox']} voxels a side)" if positions else "")
    # its optimum is a dark lesion anywhere (in the read cells): not one image, so no known_corr; lesion_ncc,
    # lesion_hit and lesion_map_corr measure its recovery
    return model, how, said, np.full((2,) + tuple(ds.grid.shape), np.nan, np.float32)


def _sex_control(ds: Dataset, root: Path, arch: dict, task: str, classes: list, cells: int) -> tuple:
    """The sex control: cell weights from the regional M−F effect map of the dataset."""
    if classes != ["F", "M"]:
        raise ConfigError(f"tasks.{task}.positive_control: target 'sex' needs classes F and M; got {classes}")
    if arch.get("head", "pool") != "flatten":
        raise ConfigError(f"tasks.{task}.positive_control: target 'sex' has a control only with a flatten head "
                          f"(tasks.{task}.arch.head: flatten); a pooled head's optimum is a uniform image")
    effect = np.asarray(nib.load(root / "sex_effect_regional.nii.gz").dataobj, np.float32)
    n_blocks = len(arch["channels"])
    w = sex_cell_weights(effect, n_blocks)
    model = sex_control_network(narrowed(arch, 2), ds.grid.shape, w, n_classes=2, male=classes.index("M"))
    known = sex_known_pattern(ds.grid.shape, w, n_blocks)
    mask = np.asarray(nib.load(root / "mask.nii.gz").dataobj) > 0
    ceiling = float(np.corrcoef(known[mask], effect[mask])[0, 1])  # effect_corr of the optimum (report.metrics)
    how = {"head": "flatten", "cell_size_vox": 2 ** n_blocks, "cells_read": int((w != 0).sum()),
           "cells_bright": int((w > 0).sum()), "offset": SEX_OFFSET, "effect_corr_of_optimum": round(ceiling, 4)}
    said = (f"'M' reads the regional sex effect on {how['cells_read']} cells of {how['cell_size_vox']} voxels "
            f"({how['cells_bright']} bright); its optimum's effect_corr is {ceiling:.3f}")
    # a cell with voxels outside the brain mask (0 in a masked image) has no single optimum: the 0s cap a bright
    # cell's minimum, so any in-brain values >= 0 are optimal; its known optimum is left undefined (NaN)
    inside = _cells_inside(mask, n_blocks)
    known = np.where(inside, known, 0)
    how["cells_known"] = int(((w != 0) & _cell_grid(mask, n_blocks)).sum())
    said += f"; its optimum is one image on {how['cells_known']} cells wholly inside the brain mask"
    optimum = np.stack([-known, known] if classes.index("M") == 1 else [known, -known])
    return model, how, said, np.where(optimum == 0, np.nan, optimum).astype(np.float32)  # unread voxels: free


def _cell_grid(mask: np.ndarray, n_blocks: int) -> np.ndarray:
    """Per cell of the last feature maps: whether its input window lies wholly inside ``mask``."""
    return _cell_view(np.asarray(mask, bool), n_blocks).all((1, 3, 5))


def _cells_inside(mask: np.ndarray, n_blocks: int) -> np.ndarray:
    """:func:`_cell_grid` on the voxel grid (False past the last whole cell)."""
    return _cells_to_voxels(_cell_grid(mask, n_blocks), mask.shape, n_blocks, fill=False)
