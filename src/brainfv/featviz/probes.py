"""Where a neuron objective probes, and which class a unit prefers: both measured from the data.

A ``neuron`` objective reads one position of a layer's map. At the map's centre (the default) it reads about
MNI (1.5, −16.5, 7.5) on the study grid — thalamus and third ventricle, where no lesion is ever planted — so
``featviz.layers[].position`` can place it where the concept lives:

- ``centre``: the map's centre (as before);
- ``lesions``: the map position whose receptive field lies inside the grid and whose central part holds the
  most planted lesions (the lesion dataset's ``lesion_frequency.nii.gz``); every task's request probes the same
  position, so the other task's model is a fair control there;
- ``[x, y, z]``: the map position whose receptive-field centre is nearest to that MNI point (mm).

``positions: K`` (``lesions`` only; default 1) probes each unit at several places (:func:`probe_positions`): the
K map positions whose receptive field fits the grid and whose central part holds the most planted lesions, taken
greedily in that order, each kept only if its receptive-field centre lies at least half a receptive field from
every one kept before along some axis (so no two probes share more than half their voxels along that axis); the
first is the single ``lesions`` position. Fewer than K such positions is a :class:`ConfigError` naming the key
and how many fit. ``centre`` and an MNI point are one place each: K > 1 is a config error there.

A unit's *preferred class* (:func:`class_preference`) is read on labelled validation volumes: the class with the
higher mean objective value and the standardised difference (Cohen's d) between the two classes. Metrics that
ask "does it look like a dark lesion" are read with that sign (a unit that prefers lesion-free volumes is
scored for *not* showing a dark lesion, like the 'absent' logit).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import layer_key
from ..data.grid import Grid
from ..errors import ConfigError

__all__ = ["probe_position", "probe_positions", "request_position", "request_positions", "position_mm",
           "class_preference"]


def _field(model, layer, shape, device="cpu"):
    from .units import layer_output_shape, receptive_field

    rf = receptive_field(model, layer, (1,) + tuple(shape), device)
    if rf is None:
        raise ConfigError(f"featviz.layers position: the receptive field of {layer!r} is unknown (not a chain of "
                          "convolutions and pooling), so a probe position cannot be chosen; use position: centre")
    out = layer_output_shape(model, layer, (1,) + tuple(shape), device)[1:]
    return rf, tuple(int(n) for n in out)


def probe_position(model: nn.Module, layer: str, shape: Sequence[int], grid: Grid,
                   spec: dict | str | Sequence[float] | None, frequency: np.ndarray | None = None,
                   device: str | torch.device = "cpu") -> tuple[int, ...] | None:
    """The map position (tuple) that request ``spec`` (``position``: ``centre``, ``lesions`` or MNI mm)
    probes, or ``None`` for the centre. ``frequency``: the planted-lesion frequency on the grid."""
    return probe_positions(model, layer, shape, grid, spec, frequency, device, 1)[0]


def probe_positions(model: nn.Module, layer: str, shape: Sequence[int], grid: Grid,
                    spec: dict | str | Sequence[float] | None, frequency: np.ndarray | None = None,
                    device: str | torch.device = "cpu", k: int = 1,
                    key: str = "featviz.layers[].positions") -> list[tuple[int, ...] | None]:
    """The ``k`` map positions that request ``spec`` probes (``[None]`` for the centre), most lesion-rich first
    for ``lesions`` (see the module docstring: receptive fields inside the grid, centres at least half a receptive
    field apart); ``key`` names the config key in the error when fewer than ``k`` qualify."""
    where = spec if not isinstance(spec, dict) else layer_key(spec, "position")
    k = int(k)
    if k < 1:
        raise ConfigError(f"{key} must be at least 1; got {k}")
    if k > 1 and where != "lesions":
        raise ConfigError(f"{key}: {k} positions need position: lesions (position {where!r} is one place)")
    if where in (None, "centre"):
        return [None]
    rf, out = _field(model, layer, shape, device)
    size = np.array([r[0] for r in rf])
    stride = np.array([r[1] for r in rf])
    offset = np.array([r[2] for r in rf])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out], indexing="ij"), -1)
    lo = idx * stride - offset
    valid = np.all((lo >= 0) & (lo + size <= np.asarray(shape)), axis=-1)
    if not valid.any():
        raise ConfigError(f"featviz.layers position: no unit of {layer!r} has its whole receptive field "
                          f"({tuple(size)} voxels) inside the grid {tuple(shape)}")
    centre = lo + (size - 1) / 2
    if where == "lesions":
        if frequency is None:
            raise ConfigError("featviz.layers position: lesions needs the lesion dataset's lesion frequency map")
        from scipy.ndimage import uniform_filter

        core = np.maximum(size // 2, 1)
        smooth = uniform_filter(np.asarray(frequency, np.float64), size=tuple(int(c) for c in core), mode="constant")
        c = np.clip(np.rint(centre).astype(int), 0, np.asarray(shape) - 1)
        score = np.where(valid, smooth[c[..., 0], c[..., 1], c[..., 2]], -np.inf)
        if not np.isfinite(score).any() or score.max() <= 0:
            raise ConfigError(f"featviz.layers position: lesions: no unit of {layer!r} whose receptive field fits "
                              "the grid sees a planted lesion")
        return _separated(score, centre.reshape(-1, 3), size, k, f"{key} ({layer!r})")
    xyz = np.asarray(where, float)
    if xyz.shape != (3,):
        raise ConfigError(f"featviz.layers position must be centre, lesions or [x, y, z] (mm); got {where!r}")
    vox = grid.voxel_coords(xyz)
    d = np.where(valid, np.linalg.norm(centre - vox, axis=-1), np.inf)
    return [tuple(int(i) for i in np.unravel_index(np.argmin(d), out))]


def _separated(score: np.ndarray, centres: np.ndarray, size: np.ndarray, k: int, key: str) -> list[tuple[int, ...]]:
    """Greedily the ``k`` best-scoring map positions (score > 0; ties in map order, so the first is the argmax)
    whose receptive-field centres lie at least half a receptive field apart along some axis."""
    flat = score.ravel()
    chosen: list[int] = []
    for i in np.argsort(-flat, kind="stable"):
        if not flat[i] > 0:
            break
        if all(np.any(np.abs(centres[i] - centres[j]) >= size / 2) for j in chosen):
            chosen.append(int(i))
            if len(chosen) == k:
                break
    if len(chosen) < k:
        raise ConfigError(f"{key}: asks for {k} positions, but only {len(chosen)} map positions whose receptive "
                          f"field ({tuple(int(s) for s in size)} voxels) fits the grid see a planted lesion and lie "
                          "at least half a receptive field apart; lower positions")
    return [tuple(int(q) for q in np.unravel_index(i, score.shape)) for i in chosen]


def request_position(request: dict, position_map: str | Path | None, model: nn.Module, grid: Grid,
                     device: str | torch.device = "cpu",
                     log: Callable[[str], object] | None = None) -> tuple[int, ...] | None:
    """The map position a job's request (``objective``, ``module``, ``position``) probes, or None (the centre
    or not a neuron objective); ``position_map``: the path of the lesion frequency map (for ``lesions``). With
    ``positions`` > 1, the first (most lesion-rich) of them."""
    return request_positions({**request, "positions": 1}, position_map, model, grid, device, log)[0]


def request_positions(request: dict, position_map: str | Path | None, model: nn.Module, grid: Grid,
                      device: str | torch.device = "cpu",
                      log: Callable[[str], object] | None = None) -> list[tuple[int, ...] | None]:
    """The map positions a job's request probes (its ``positions``, default 1; :func:`probe_positions`):
    ``[None]`` for the centre or an objective other than neuron."""
    k = int(layer_key(request, "positions"))
    if request["objective"] != "neuron" or layer_key(request, "position") == "centre":
        return [None]
    freq = None
    if position_map:
        import nibabel as nib

        freq = np.asarray(nib.load(position_map).dataobj, np.float32)
    key = f"featviz.layers[{request.get('layer', request['module'])}].positions"
    found = probe_positions(model, request["module"], grid.shape, grid, request["position"], freq, device, k, key)
    if log:
        for i, pos in enumerate(found):
            mm = position_mm(model, request["module"], grid.shape, grid, pos, device)
            which = f" {i + 1} of {len(found)}" if len(found) > 1 else ""
            log(f"probe position{which} of {request['module']}: map index {pos}, receptive-field centre at MNI "
                f"{tuple(round(v, 1) for v in mm)} mm")
    return found


def position_mm(model: nn.Module, layer: str, shape: Sequence[int], grid: Grid, position: Sequence[int] | None,
                device: str | torch.device = "cpu") -> tuple[float, ...]:
    """MNI coordinates (mm) of the receptive-field centre of map ``position`` (None: the map's centre)."""
    rf, out = _field(model, layer, shape, device)
    p = np.asarray(position if position is not None else [n // 2 for n in out], float)
    centre = p * np.array([r[1] for r in rf]) - np.array([r[2] for r in rf]) + (np.array([r[0] for r in rf]) - 1) / 2
    return tuple(float(v) for v in grid.world_coords(centre))


def class_preference(values: np.ndarray, labels: Sequence | np.ndarray,
                     classes: Sequence) -> tuple[list[str], np.ndarray]:
    """Per unit (columns of ``values``, one row per labelled volume): the class with the higher mean value
    and Cohen's d of the last class against the first (pooled SD; NaN where undefined)."""
    values = np.asarray(values, np.float64)
    labels = np.asarray(labels).astype(str)
    a, b = values[labels == str(classes[0])], values[labels == str(classes[-1])]
    if len(a) < 2 or len(b) < 2:
        return [""] * values.shape[1], np.full(values.shape[1], np.nan)
    pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
    diff = b.mean(0) - a.mean(0)
    d = np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1), np.nan)
    pref = [str(classes[-1]) if x > 0 else str(classes[0]) if x < 0 else "" for x in diff]
    return pref, d
