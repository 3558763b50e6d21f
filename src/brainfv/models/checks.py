"""Checking a model against the cohort grid: its stated input, a probe forward, the layer that gives its output."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .load import NORMALISATIONS, _input_info, _normalisation_name
from .torchscript import eval_mode, first_line

__all__ = ["check_model_input", "check_model_dataset", "find_output_layer"]


def check_model_input(info: dict, grid_shape: Sequence[int], voxel_size: float | Sequence[float] | None,
                      model: nn.Module | None = None, *, normalisation: str | None = "zscore-brain",
                      where: str = "model", device: str | torch.device | None = None, rtol: float = 1e-3,
                      grid_label: str = "the cohort grid") -> tuple | None:
    """Check that the cohort's grid is what the model was trained on; optionally probe the model with it.

    Parameters
    ----------
    info : dict
        ``info`` from :func:`load_model`, or the spec itself (its ``input`` and ``classes`` are read).
    grid_shape : sequence of 3 int
        The cohort grid (e.g. ``Grid.shape``).
    voxel_size : float or sequence of 3 float or None
        The cohort's voxel size in mm (None: not checked).
    model : nn.Module, optional
        If given, one forward pass with a zero tensor ``(1, channels, *grid_shape)`` (no gradients)
        confirms the model accepts the grid, and its output is compared with ``classes``.
    normalisation : str
        The cohort's intensity normalisation (brainfv cohorts: ``zscore-brain``).
    where : str
        Config key of the spec, for messages.
    grid_label : str
        How messages call the grid (e.g. ``"the --shape grid"`` on the command line).

    Returns
    -------
    tuple or None
        The output shape (without batch) of the probe forward, or None without ``model``.

    Raises
    ------
    ConfigError
        Naming what the model expects and what the cohort provides.
    """
    if not isinstance(info, dict):
        raise ConfigError(f"{where}: expected the info dict of load_model or the model spec, got {info!r}")
    inp = _input_info(info.get("input"), where)  # validates a raw spec; idempotent on load_model's info
    grid_shape = tuple(int(s) for s in grid_shape)
    cohort = f"{grid_label} is {_fmt_shape(grid_shape)} voxels" + (
        f" of {_fmt_vs(voxel_size)} mm" if voxel_size is not None else "")
    expects = []
    if inp.get("shape") is not None and tuple(inp["shape"]) != grid_shape:
        expects.append(f"input {_fmt_shape(inp['shape'])} ({where}.input.shape)")
    if inp.get("voxel_size") is not None and voxel_size is not None and not _same_vs(inp["voxel_size"], voxel_size,
                                                                                      rtol):
        expects.append(f"{_fmt_vs(inp['voxel_size'])} mm voxels ({where}.input.voxel_size)")
    problems = [f"the model expects {' and '.join(expects)} but {cohort}"] if expects else []
    want = _normalisation_name(inp.get("normalisation"), f"{where}.input.normalisation")
    have = _normalisation_name(normalisation, "cohort normalisation")
    if want is not None and have is not None and want != have:
        problems.append(f"the model expects intensities {want} ({NORMALISATIONS[want]}; "
                        f"{where}.input.normalisation) but the cohort provides {have} ({NORMALISATIONS[have]})")
    if problems:
        raise ConfigError(f"{where}: the model does not match {_dataset_name(grid_label)}: " + "; ".join(problems)
                          + ". Use data on the model's training grid (in the workflow: set grid.voxel_size and "
                            "grid.bbox_mm), or correct the model's input section if it is wrong")
    return None if model is None else _probe(model, info, inp, grid_shape, where, device, grid_label, cohort)


def _probe(model, info, inp, grid_shape, where, device, grid_label, cohort):
    """One forward pass of a zero input on the grid (no gradients): the model accepts the grid, and its output
    has one value per class in ``classes``; returns the output shape without batch."""
    channels = int(inp.get("channels") or 1)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else "cpu"
    x = torch.zeros((1, channels) + grid_shape, device=device)
    with eval_mode(model), torch.no_grad():
        try:
            out = model(x)
        except Exception as e:  # noqa: BLE001 - explain shape errors in terms of the cohort
            raise ConfigError(f"{where}: the model fails on an input of {grid_label} (tensor "
                              f"{_fmt_shape(tuple(x.shape))}: batch, channels, X, Y, Z; {cohort}): "
                              f"{type(e).__name__}: {first_line(e)}. Was it trained on another grid, or with "
                              f"other than {channels} input channel{'s' if channels > 1 else ''} "
                              f"({where}.input.channels)?") from e
    if not torch.is_tensor(out):
        return None
    classes = info.get("classes") if isinstance(info, dict) else None
    if classes and (out.ndim != 2 or out.shape[1] != len(classes)):
        raise ConfigError(f"{where}.classes: {len(classes)} classes {list(classes)} but the model's output "
                          f"on the cohort grid has shape {tuple(out.shape[1:])} (without batch)")
    return tuple(out.shape[1:])


def check_model_dataset(model: nn.Module, info: dict, grid: object, *, where: str = "model",
                        dataset: str = "the cohort", log: Callable | None = None,
                        probe: bool = True) -> tuple | None:
    """The one check of a model against the dataset it is about to be run on, shared by the workflow
    (``describe_model``, every ``visualize`` job) and ``brainfv visualize``.

    The grid the model states (a brainfv checkpoint's training grid, or a spec's ``input.shape`` /
    ``input.voxel_size`` / ``input.normalisation``) must be the dataset's, and (``probe``) one forward pass on
    the dataset's grid must work. A model that states no grid cannot be checked: ``log`` gets a warning
    saying so (a network with adaptive pooling accepts any grid, so nothing else would notice). ``info``: of
    :func:`brainfv.models.load.load_model`; ``grid``: the dataset's :class:`~brainfv.data.grid.Grid`;
    ``where``: the model's config key or command-line name; ``dataset``: how messages name the dataset.
    Returns the output shape of the probe forward, as :func:`check_model_input`.
    """
    stated = info.get("input") or {}
    if stated.get("shape") is None and stated.get("voxel_size") is None and log is not None:
        log(f"WARNING: {where} does not state the grid it was trained on (input.shape, input.voxel_size), so it "
            f"cannot be checked against {dataset} ({_fmt_shape(grid.shape)} voxels of {_fmt_vs(grid.voxel_size)} mm); "
            f"state it in the model's input section")
    return check_model_input(info, grid.shape, grid.voxel_size, model if probe else None, where=where,
                             grid_label=f"{dataset}'s grid")


def _dataset_name(grid_label):
    return grid_label.removesuffix("'s grid").removesuffix(" grid")


def _same_vs(a, b, rtol):
    a = [float(v) for v in (a if isinstance(a, (list, tuple)) else [a] * 3)]
    b = [float(v) for v in (b if isinstance(b, (list, tuple)) else [b] * 3)]
    a, b = (a * 3 if len(a) == 1 else a), (b * 3 if len(b) == 1 else b)
    return all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


def _fmt_shape(shape):
    return "x".join(str(int(s)) for s in shape)


def _fmt_vs(vs):
    vals = vs if isinstance(vs, (list, tuple)) else [vs]
    return "x".join(f"{float(v):g}" for v in vals)


def find_output_layer(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu") -> str | None:
    """The module that produces the model's output (the class logits): the innermost module whose output
    *is* the tensor the model returns (for a wrapped TorchScript module: the last leaf module whose output
    equals it), on one zero input of ``input_shape`` (C, X, Y, Z); None if no module returns it as it is
    (e.g. a final functional op)."""
    hits = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: hits.append((name, o)))
               for name, m in model.named_modules() if name]
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros((1,) + tuple(input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
    for name, o in hits:  # hooks fire innermost first
        if o is out:
            return name
    # a wrapped TorchScript module returns its graph's tensor, not the one a hook sees: compare values
    leaves = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    same = [n for n, o in hits if n in leaves and torch.is_tensor(o) and o.shape == out.shape and torch.equal(o, out)]
    return same[-1] if same else None
