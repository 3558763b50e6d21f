"""Receptive-field cropping: optimise only the input voxels an objective can see.

A neuron objective reads one position of a layer's map, which depends on a small cube of the input
(its receptive field). Optimising that cube alone gives the same activation for far less work. The
plan is derived from the objective's declared footprint (the positions it reads), never from its
kind, so ``-neuron``, ``2 * neuron`` or ``neuron_a + neuron_b`` are cropped correctly; it is verified
by evaluating the whole objective on a random volume and on its crop.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .objectives import Activations, Objective, neuron
from .units import capture_activations, layer_output_shape, receptive_field

__all__ = ["CropPlan", "plan_crop", "crop_box"]


@dataclass(frozen=True)
class CropPlan:
    """Where to crop the input (``box``: one slice per axis) and where each read layer's cropped map sits
    in the full volume's map (``origins``, ``full_shapes``)."""

    box: tuple
    origins: dict
    full_shapes: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.box)

    def activations(self, acts: dict) -> Activations:
        """Wrap activations of the cropped input so objectives index full-volume positions."""
        return Activations(acts, self.origins, self.full_shapes)


def _layer_geometry(model, layer, shape, device):
    out = layer_output_shape(model, layer, (1,) + tuple(shape), device)
    if len(out) != 4:  # (C, X, Y, Z) only
        return None
    rf = receptive_field(model, layer, (1,) + tuple(shape), device)
    return (out[1:], rf) if rf is not None else None


def plan_crop(model: nn.Module, objective: Objective, shape: Sequence[int], device: str | torch.device = "cpu",
              verify: bool = True, log: Callable | None = None) -> CropPlan | None:
    """A :class:`CropPlan` for ``objective`` on inputs of ``shape``, or ``None`` (optimise the whole volume).

    ``None`` when the objective reads whole maps, a layer's receptive field cannot be derived, the
    crop would not be smaller, or (with ``verify``) the cropped evaluation differs from the full one.
    The crop starts at a multiple of every read layer's total stride, so cropped maps line up with
    the full maps.
    """
    log = log or (lambda m: None)
    fp = objective.footprint
    if not fp:
        return None
    geo = {}
    for layer in fp:
        g = _layer_geometry(model, layer, shape, device)
        if g is None:
            return None
        geo[layer] = g
    align = [math.lcm(*[int(geo[name][1][a][1]) for name in fp]) for a in range(3)]
    lo, hi = [None] * 3, [None] * 3
    for layer, positions in fp.items():
        out_shape, rf = geo[layer]
        for pos in positions:
            p = tuple(s // 2 for s in out_shape) if pos is None else tuple(pos)
            for a, ((size, stride, offset), q) in enumerate(zip(rf, p)):
                start, stop = q * stride - offset, q * stride - offset + size
                lo[a] = start if lo[a] is None else min(lo[a], start)
                hi[a] = stop if hi[a] is None else max(hi[a], stop)
    box = []
    for a, n in enumerate(shape):
        start = (max(0, lo[a]) // align[a]) * align[a]
        stop = min(n, start + int(math.ceil((min(n, hi[a]) - start) / align[a])) * align[a])
        box.append(slice(start, stop))
    box = tuple(box)
    if np.prod([s.stop - s.start for s in box]) >= np.prod(shape):
        return None
    plan = CropPlan(box, {name: tuple(s.start // int(geo[name][1][a][1]) for a, s in enumerate(box)) for name in fp},
                    {name: tuple(geo[name][0]) for name in fp})
    if verify and not _verified(model, objective, shape, plan, device, log):
        return None
    log(f"receptive-field crop: optimising {plan.shape} instead of {tuple(shape)}")
    return plan


@torch.no_grad()
def _verified(model, objective, shape, plan, device, log):
    b = objective.batch or 1
    x = torch.randn((1, 1) + tuple(shape), generator=torch.Generator().manual_seed(0)).to(device).expand(
        (b, 1) + tuple(shape)).contiguous()
    full = objective(capture_activations(model, x, objective.layers))
    part = objective(plan.activations(capture_activations(model, x[(...,) + plan.box], objective.layers)))
    if torch.allclose(full, part, rtol=1e-4, atol=1e-5):
        return True
    log(f"receptive-field crop changes the objective ({float(full[0]):.5f} vs {float(part[0]):.5f}); "
        f"optimising the full volume")
    return False


def crop_box(model: nn.Module, layer: str, input_shape: Sequence[int], position: tuple | None = None,
             device: str | torch.device = "cpu") -> tuple:
    """Input crop (slices) holding the receptive field of ``layer``'s unit at ``position`` (default: the
    centre of its map), and that position inside the cropped map; ``(None, position)`` if it cannot be
    derived."""
    plan = plan_crop(model, neuron(layer, 0, position), input_shape, device, verify=False)
    if plan is None:
        return None, position
    full = plan.full_shapes[layer]
    p = tuple(s // 2 for s in full) if position is None else tuple(position)
    return plan.box, tuple(q - o for q, o in zip(p, plan.origins[layer]))
