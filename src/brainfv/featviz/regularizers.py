"""Regularizers: one function per kind of term, each mapping ``(B, 1, X, Y, Z)`` to a penalty per element.

A preset (config ``featviz.regularizers``) names the weights; adding a new kind of term is one
function here plus its name in :data:`PENALTIES`.
"""
from __future__ import annotations

import torch

from .param import frequencies

__all__ = ["l1", "l2", "total_variation", "frequency_penalty", "PENALTIES", "penalty"]


def l1(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute value."""
    return x.abs().flatten(1).mean(1)


def l2(x: torch.Tensor) -> torch.Tensor:
    """Mean squared value (with a linear objective its optimum is proportional to the unit's weights)."""
    return (x ** 2).flatten(1).mean(1)


def total_variation(x: torch.Tensor, power: float = 2) -> torch.Tensor:
    """3D total variation of ``(B, ...)`` volumes: the sum over the three axes of the mean
    ``|neighbour difference| ** power`` (``power=2``: the smooth, squared form used as a penalty;
    ``power=1``: the classic form, used by :func:`brainfv.featviz.metrics.relative_tv`)."""
    d = (x[..., 1:, :, :] - x[..., :-1, :, :], x[..., :, 1:, :] - x[..., :, :-1, :],
         x[..., :, :, 1:] - x[..., :, :, :-1])
    t = [(a.abs() if power == 1 else a ** 2 if power == 2 else a.abs() ** power).flatten(1).mean(1) for a in d]
    return t[0] + t[1] + t[2]


def frequency_penalty(x: torch.Tensor) -> torch.Tensor:
    """Power-weighted mean frequency: energy at high spatial frequencies costs more."""
    spec = torch.fft.rfftn(x, dim=(-3, -2, -1)).abs() ** 2
    f = frequencies(x.shape[-3:], device=x.device)
    return (spec * f).flatten(1).sum(1) / (spec.flatten(1).sum(1) + 1e-8) * l2(x)


PENALTIES = {"l1": l1, "l2": l2, "tv": total_variation, "freq": frequency_penalty}


def penalty(x: torch.Tensor, weights: dict) -> torch.Tensor:
    """Sum of ``weight * term(x)`` over the terms named in ``weights`` (per batch element)."""
    total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for name, w in weights.items():
        if w:
            total = total + w * PENALTIES[name](x)
    return total
