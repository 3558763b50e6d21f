"""Attribution maps of class logits: which voxels of real subjects drive a trained model's decision.

Complements feature visualization (what a unit *would* respond to) with what the model *uses* on the
cohort: for every class ``c``, the attribution of logit ``c`` is computed for each subject of class
``c`` and averaged over the subjects the model classifies correctly. Methods come from captum:

========================  ==============================================================================
``integrated_gradients``  :class:`captum.attr.IntegratedGradients` (Gauss-Legendre path, ``n_steps``)
                          from a baseline to the subject; attributions sum to ``logit(x) - logit(base)``.
``gradcam``               :class:`captum.attr.LayerGradCam` on one conv/norm layer (default: the last
                          one by module order), upsampled to the input grid along the layer's receptive
                          field geometry with :meth:`captum.attr.LayerAttribution.interpolate`
                          (trilinear), so feature position ``p`` lands on its receptive-field centre.
``saliency``              :class:`captum.attr.Saliency` with ``abs=False`` (the signed gradient).
``input_x_gradient``      :class:`captum.attr.InputXGradient` (gradient times input, i.e. IG's
                          first-order approximation from a zero baseline).
========================  ==============================================================================

Sign convention (the same for every method): **positive = evidence for class c** (increasing the
voxel's value from the baseline, or the layer's activation, raises logit ``c``); negative = evidence
against it. Grad-CAM is returned *without* its usual ReLU so the two signs are comparable to IG.
Both a signed mean (``maps``; positive and negative evidence can cancel across subjects) and a mean of
per-subject absolute maps (``maps_abs``; importance regardless of direction, which does not cancel) are
returned.

Volumes are streamed in batches of ``batch_size`` (memory does not grow with the cohort); the
caller's model is not modified (an eval-mode copy with frozen parameters is used).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import captum.attr as ca
import numpy as np
import pandas as pd
import torch
from captum.attr import LayerAttribution
from torch import nn

from .config import default
from .data.grid import Grid
from .errors import ConfigError, InputDataError
from .featviz.simplify import fft_large_convs, one_channel_convs
from .featviz.units import get_module, receptive_field
from .models.cnn import frozen
from .utils import Progress, atomic_path

__all__ = ["METHODS", "class_attribution_maps", "default_cam_layer", "attribution_table",
           "write_attribution_nifti", "write_attribution_table", "RowView"]

METHODS = ("integrated_gradients", "gradcam", "saliency", "input_x_gradient")
_CAM_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


def default_cam_layer(model: nn.Module) -> str:
    """Name of the last Conv/norm module of ``model`` in ``named_modules()`` order (Grad-CAM's default)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, _CAM_LAYERS)]
    if not names:
        raise ConfigError(f"gradcam: {type(model).__name__} has no Conv or norm layer; pass layer=<module name>")
    return names[-1]


def _frozen_copy(model, device):
    """A frozen copy whose large-kernel convolutions run by FFT (the positive controls' lesion template,
    :func:`brainfv.featviz.simplify.fft_large_convs`) and whose one-channel input convolution takes its input
    gradient by a depthwise convolution (:func:`~brainfv.featviz.simplify.one_channel_convs`): the same function
    and gradients, float rounding apart."""
    net = frozen(model, device)
    fft_large_convs(net)
    one_channel_convs(net)
    return net


def _baseline(baseline, shape, device):
    """Baseline tensor (1, 1, X, Y, Z) for IG."""
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise ConfigError(f"attribution baseline must be 'zeros', a number or an array of the volume shape; "
                              f"got {baseline!r}")
        return torch.zeros((1, 1) + tuple(shape), device=device)
    if np.isscalar(baseline):
        return torch.full((1, 1) + tuple(shape), float(baseline), device=device)
    b = np.asarray(baseline, dtype=np.float32)
    if b.shape != tuple(shape):
        raise ConfigError(f"attribution baseline has shape {b.shape}; expected the volume shape {tuple(shape)}")
    return torch.as_tensor(b, device=device)[None, None]


def _batches(volumes, labels, batch_size):
    """Yield ``(first_index, stacked float32 array (B, X, Y, Z), labels)``; one batch alive at a time."""
    it = iter(volumes)
    i = 0
    while True:
        vols = []
        for _ in range(batch_size):
            try:
                vols.append(np.asarray(next(it), dtype=np.float32))
            except StopIteration:
                break
        if not vols:
            return
        shapes = {v.shape for v in vols}
        if len(shapes) != 1 or len(vols[0].shape) != 3:
            raise InputDataError(f"volumes {i}..{i + len(vols) - 1}: expected 3D arrays of one shape, got "
                                 f"shapes {sorted(shapes)}")
        x = np.stack(vols)
        del vols
        n = len(x)
        yield i, x, labels[i:i + n]
        del x  # not alive while the next batch is read
        i += n


def _rf_upsample(cam, rf, input_shape):
    """Upsample a layer map (B, 1, x, y, z) to ``input_shape`` so position ``p`` lands on its RF centre.

    With receptive field ``(size, stride, offset)`` per axis, feature position ``p`` is centred on input
    coordinate ``p * stride - offset + (size - 1) / 2``. Trilinear interpolation to ``n * stride`` voxels
    (captum's ``LayerAttribution.interpolate``, ``align_corners=False``) centres ``p`` on
    ``p * stride + (stride - 1) / 2``; the remaining integer shift is applied by cropping or
    edge-replicating. Without a known receptive field, the map is stretched onto the input shape.
    """
    if rf is None:
        return LayerAttribution.interpolate(cam, tuple(input_shape), "trilinear")
    up = LayerAttribution.interpolate(cam, tuple(n * s for n, (_, s, _) in zip(cam.shape[2:], rf)), "trilinear")
    for axis, ((size, stride, offset), n_in) in enumerate(zip(rf, input_shape)):
        shift = int(round(-offset + (size - 1) / 2 - (stride - 1) / 2))  # input index = upsampled index + shift
        idx = (torch.arange(n_in, device=up.device) - shift).clamp(0, up.shape[axis + 2] - 1)
        up = up.index_select(axis + 2, idx)  # crops, shifts and edge-replicates in one step
    return up


def _explainer(model, method, layer, x_shape, device):
    """``fn(x, target) -> attributions (B, X, Y, Z)`` for ``method``, and the Grad-CAM layer used."""
    if method == "gradcam":
        layer = layer or default_cam_layer(model)
        gc = ca.LayerGradCam(model, get_module(model, layer))
        rf = receptive_field(model, layer, (1,) + tuple(x_shape), device)

        def fn(x, target, **kw):
            cam = gc.attribute(x, target=target, relu_attributions=False, attr_dim_summation=True)
            if cam.dim() != 5:
                raise ConfigError(f"gradcam: layer {layer!r} output is not a 3D feature map (attribution shape "
                                  f"{tuple(cam.shape)}); choose a Conv3d or norm layer")
            return _rf_upsample(cam, rf, x_shape)[:, 0], None

        return fn, layer
    if method == "integrated_gradients":
        ig = ca.IntegratedGradients(model)

        def fn(x, target, baseline=None, n_steps=32, internal_batch_size=None):
            a, delta = ig.attribute(x, baselines=baseline.expand_as(x), target=target, n_steps=n_steps,
                                    internal_batch_size=internal_batch_size, return_convergence_delta=True)
            return a[:, 0], delta

        return fn, None
    if method == "saliency":
        sal = ca.Saliency(model)
        return (lambda x, target, **kw: (sal.attribute(x.requires_grad_(), target=target, abs=False)[:, 0], None)), None
    if method == "input_x_gradient":
        ixg = ca.InputXGradient(model)
        return (lambda x, target, **kw: (ixg.attribute(x.requires_grad_(), target=target)[:, 0], None)), None
    raise ConfigError(f"attribution method must be one of {list(METHODS)}; got {method!r}")


def class_attribution_maps(model: nn.Module, volumes: Iterable, labels: Sequence[int], n_classes: int,
                           method: str = "integrated_gradients", *, baseline: str | float | np.ndarray = "zeros",
                           n_steps: int = default("attribution.n_steps"), batch_size: int = 4,
                           device: str | torch.device = "cpu", only_correct: bool = True, layer: str | None = None,
                           internal_batch_size: int | None = None, log: Callable | None = None) -> dict:
    """Mean attribution map of each class's logit over the subjects of that class.

    For every subject ``i`` the attribution of logit ``labels[i]`` (the pre-softmax output of the true
    class) is computed; class ``c``'s maps average over the subjects of class ``c`` that the model
    classifies correctly (``argmax`` of the logits == ``c``), or over all of them with
    ``only_correct=False``. Positive values are evidence for class ``c`` (see the module docstring).

    ``model`` maps ``(B, 1, X, Y, Z)`` to logits ``(B, n_classes)`` and is not modified (an eval-mode copy
    with frozen parameters is used). ``volumes``: indexable or iterable of 3D arrays, read in order,
    ``batch_size`` at a time; ``labels``: the class index of each. ``method``: ``integrated_gradients`` |
    ``gradcam`` | ``saliency`` | ``input_x_gradient``. IG only: ``baseline`` (``"zeros"``, the brain-mask mean
    intensity of z-scored data, or a number or array used as given), ``n_steps`` (Gauss-Legendre points) and
    ``internal_batch_size`` (the most path points in one pass, default ``max(16, 2 * batch_size)``: about 1 GB
    on the CPU for the default model at 52x64x52; raise it on a GPU). Grad-CAM only: ``layer`` (default
    :func:`default_cam_layer`). ``log``: a callable for progress lines.

    Returns a dict with ``maps`` {c: (X, Y, Z) float32} (signed mean over the subjects used, ``n_used``),
    ``maps_abs`` (mean ``|attribution|`` over the same), ``maps_all`` (signed mean over all subjects of class
    ``c``), ``n_subjects``, ``n_correct``, ``n_used``, ``delta`` (IG only: mean absolute completeness error
    ``|sum(attr) - (logit(x) - logit(baseline))|``, a check that ``n_steps`` suffices; NaN otherwise) and
    ``method``, ``layer``, ``n_steps``, ``baseline``, ``only_correct``, ``n_classes``, ``seconds``. A class with
    no subject used has an all-zero map. Deterministic on the CPU (float64 sums in input order).
    """
    labels = _checked_labels(method, batch_size, n_steps, labels, n_classes, volumes)
    device = torch.device(device)
    log = log or (lambda m: None)
    net = _frozen_copy(model, device)
    batch_size = int(batch_size)
    ibs = max(int(internal_batch_size) if internal_batch_size else 16, 2 * batch_size)
    prog, t0 = Progress(len(labels), f"attribution ({method})", log=log, unit="subjects"), time.perf_counter()
    sums = _ClassSums(n_classes, only_correct)
    fn = base = cam_layer = shape = None
    n_seen = 0  # volumes read
    for start, xb, yb in _batches(volumes, labels, batch_size):
        if len(yb) < len(xb):
            raise InputDataError(f"more volumes than labels ({len(labels)})")
        if fn is None:
            shape = xb.shape[1:]
            fn, cam_layer = _explainer(net, method, layer, shape, device)
            base = _baseline(baseline, shape, device) if method == "integrated_gradients" else None
            sums.start(shape)
        elif xb.shape[1:] != shape:
            raise InputDataError(f"volume {start} has shape {xb.shape[1:]}; earlier volumes {shape}")
        sums.add(yb, *_attribute_batch(net, fn, xb, yb, n_classes, device, baseline=base, n_steps=int(n_steps),
                                       internal_batch_size=ibs))
        del xb
        n_seen += len(yb)
        prog.update(len(yb))
    if n_seen != len(labels):
        raise InputDataError(f"{n_seen} volumes but {len(labels)} labels")
    return {**sums.result(method, log), "method": method, "layer": cam_layer,
            "n_steps": int(n_steps) if method == "integrated_gradients" else None,
            "baseline": (baseline if isinstance(baseline, str) or np.isscalar(baseline) else "array")
            if method == "integrated_gradients" else None,
            "only_correct": bool(only_correct), "n_classes": int(n_classes), "seconds": time.perf_counter() - t0}


def _attribute_batch(net: nn.Module, fn: Callable, xb: np.ndarray, yb: np.ndarray, n_classes: int,
                     device: torch.device, **kw: object) -> tuple:
    """One batch's attributions of the true classes' logits (float64), whether each volume is classified
    correctly, and IG's completeness errors (None for other methods)."""
    x = torch.as_tensor(xb, device=device)[:, None]
    target = torch.as_tensor(yb, dtype=torch.long, device=device)
    with torch.no_grad():
        logits = net(x)
    if logits.dim() != 2 or logits.shape[1] != n_classes:
        raise ConfigError(f"model output has shape {tuple(logits.shape)}; expected (batch, {n_classes})")
    correct = (logits.argmax(1) == target).cpu().numpy()
    attr, delta = fn(x, target, **kw)
    return attr.detach().double().cpu().numpy(), correct, delta


def _checked_labels(method: str, batch_size: int, n_steps: int, labels: object, n_classes: int,
                    volumes: object) -> np.ndarray:
    """:func:`class_attribution_maps`'s arguments checked; returns the labels as an array."""
    if method not in METHODS:
        raise ConfigError(f"attribution method must be one of {list(METHODS)}; got {method!r}")
    if int(batch_size) < 1 or int(n_steps) < 1:
        raise ConfigError(f"batch_size and n_steps must be >= 1; got {batch_size}, {n_steps}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputDataError(f"labels must be a 1D sequence of integer class indices; got dtype {labels.dtype}, "
                             f"shape {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise InputDataError(f"labels of volumes {bad[:10].tolist()} are {labels[bad[:10]].tolist()}, outside "
                             f"range({n_classes})")
    if len(labels) == 0:
        raise InputDataError("class_attribution_maps: no volumes/labels given")
    if hasattr(volumes, "__len__") and len(volumes) != len(labels):
        raise InputDataError(f"{len(volumes)} volumes but {len(labels)} labels")
    return labels


class _ClassSums:
    """Per-class sums of attribution maps (float64, in input order) and subject counts."""

    def __init__(self, n_classes: int, only_correct: bool):
        self.n_classes, self.only_correct = n_classes, only_correct
        self.sums = self.sums_abs = self.sums_all = None
        self.n_subj = np.zeros(n_classes, int)
        self.n_corr = np.zeros(n_classes, int)
        self.delta_sum = np.zeros(n_classes)

    def start(self, shape: tuple) -> None:
        self.sums, self.sums_abs, self.sums_all = (np.zeros((self.n_classes,) + shape) for _ in range(3))

    def add(self, yb: np.ndarray, attr: np.ndarray, correct: np.ndarray, delta: torch.Tensor | None) -> None:
        for j, c in enumerate(yb):
            self.n_subj[c] += 1
            self.sums_all[c] += attr[j]
            if correct[j] or not self.only_correct:
                self.sums[c] += attr[j]
                self.sums_abs[c] += np.abs(attr[j])
            self.n_corr[c] += bool(correct[j])
            if delta is not None:
                self.delta_sum[c] += abs(float(delta[j]))

    def result(self, method: str, log: Callable) -> dict:
        """The mean maps and counts (the part of :func:`class_attribution_maps`'s result they make)."""
        n_classes, n_subj = self.n_classes, self.n_subj
        n_used = self.n_corr if self.only_correct else n_subj
        for c in range(n_classes):
            if n_used[c] == 0:
                log(f"attribution ({method}): no {'correctly classified ' if self.only_correct else ''}subject of "
                    f"class {c}; its map is all zero")

        def mean(s, n):
            return {c: (s[c] / max(n[c], 1)).astype(np.float32) for c in range(n_classes)}

        return {
            "maps": mean(self.sums, n_used), "maps_abs": mean(self.sums_abs, n_used),
            "maps_all": mean(self.sums_all, n_subj),
            "n_subjects": {c: int(n_subj[c]) for c in range(n_classes)},
            "n_correct": {c: int(self.n_corr[c]) for c in range(n_classes)},
            "n_used": {c: int(n_used[c]) for c in range(n_classes)},
            "delta": {c: (float(self.delta_sum[c] / n_subj[c]) if method == "integrated_gradients" and n_subj[c]
                          else float("nan")) for c in range(n_classes)},
        }


def _class_keys(maps, classes):
    """Keys of ``maps`` in the order of ``classes`` (maps keyed by class index or by class name)."""
    keys = []
    for i, name in enumerate(classes):
        if i in maps:
            keys.append(i)
        elif name in maps:
            keys.append(name)
        else:
            raise InputDataError(f"no attribution map for class {i} ({name!r}); maps have keys {sorted(maps, key=str)}")
    return keys


def write_attribution_nifti(maps: dict, classes: list, grid: Grid, path: str | Path) -> str | Path:
    """Write ``maps`` as one 4D NIfTI on ``grid`` (volume ``i`` = class ``classes[i]``), atomically.

    ``maps`` is keyed by class index (as returned by :func:`class_attribution_maps`) or by class name;
    ``classes`` lists the class names in index order (e.g. a checkpoint's ``meta["classes"]``).
    """
    keys = _class_keys(maps, classes)
    data = np.stack([np.asarray(maps[k], np.float32) for k in keys], axis=-1)
    img = grid.to_nifti(data)
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return path


def attribution_table(result: dict, classes: list | None = None) -> pd.DataFrame:
    """One row per class: class, class_index, n_subjects, n_correct, n_used, method, layer, n_steps,
    baseline, delta (IG completeness error), seconds (the whole run)."""
    n = result["n_classes"]
    classes = list(classes) if classes is not None else list(range(n))
    if len(classes) != n:
        raise InputDataError(f"{len(classes)} class names for {n} classes")
    return pd.DataFrame([{
        "class": classes[c], "class_index": c, "n_subjects": result["n_subjects"][c],
        "n_correct": result["n_correct"][c], "n_used": result["n_used"][c], "method": result["method"],
        "layer": result["layer"], "n_steps": result["n_steps"], "baseline": result["baseline"],
        "only_correct": result["only_correct"], "delta": result["delta"][c], "seconds": result["seconds"],
    } for c in range(n)])


def write_attribution_table(result: dict, path: str | Path, classes: list | None = None) -> str | Path:
    """Write :func:`attribution_table` as a TSV, atomically."""
    with atomic_path(path) as tmp:
        attribution_table(result, classes).to_csv(tmp, sep="\t", index=False)
    return path


class RowView:
    """A lazy view of some rows of a volume store (read when indexed)."""

    def __init__(self, volumes, rows):
        self.volumes, self.rows = volumes, [int(r) for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.volumes[self.rows[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))
