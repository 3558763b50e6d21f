"""Regularizers: one function per kind of term, each mapping ``(B, 1, X, Y, Z)`` to a penalty per element.

A preset (config ``featviz.regularizers``) names the weights; adding a new kind of term is one
function here plus its name in :data:`PENALTIES`.
"""
from __future__ import annotations

import torch

__all__ = ["l1", "l2", "total_variation", "frequency_penalty", "PENALTIES", "penalty"]


def l1(x):
    """Mean absolute value."""
    return x.abs().flatten(1).mean(1)


def l2(x):
    """Mean squared value (with a linear objective its optimum is proportional to the unit's weights)."""
    return (x ** 2).flatten(1).mean(1)


def total_variation(x):
    """Mean squared difference between neighbouring voxels along the three axes (3D TV, squared form)."""
    dx = (x[..., 1:, :, :] - x[..., :-1, :, :]) ** 2
    dy = (x[..., :, 1:, :] - x[..., :, :-1, :]) ** 2
    dz = (x[..., :, :, 1:] - x[..., :, :, :-1]) ** 2
    return dx.flatten(1).mean(1) + dy.flatten(1).mean(1) + dz.flatten(1).mean(1)


def frequency_penalty(x):
    """Power-weighted mean frequency: energy at high spatial frequencies costs more."""
    spec = torch.fft.rfftn(x, dim=(-3, -2, -1)).abs() ** 2
    X, Y, Z = x.shape[-3:]
    f = torch.sqrt(torch.fft.fftfreq(X, device=x.device)[:, None, None] ** 2
                   + torch.fft.fftfreq(Y, device=x.device)[None, :, None] ** 2
                   + torch.fft.rfftfreq(Z, device=x.device)[None, None, :] ** 2)
    return (spec * f).flatten(1).sum(1) / (spec.flatten(1).sum(1) + 1e-8) * l2(x)


PENALTIES = {"l1": l1, "l2": l2, "tv": total_variation, "freq": frequency_penalty}


def penalty(x, weights):
    """Sum of ``weight * term(x)`` over the terms named in ``weights`` (per batch element)."""
    total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for name, w in weights.items():
        if w:
            total = total + w * PENALTIES[name](x)
    return total
