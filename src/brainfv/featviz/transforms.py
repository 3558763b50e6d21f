"""Differentiable, batched 3D transforms applied before each forward pass (transformation robustness).

Each random transform draws its parameters for batch element ``b`` from that element's own
``torch.Generator``, so a unit optimised alone or in a batch sees the same transforms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["jitter", "random_affine", "gaussian_blur", "gaussian_kernel1d"]


def jitter(x: torch.Tensor, n: int, gens: list) -> torch.Tensor:
    """Shift each volume by a random integer offset in ``[-n, n]`` per axis (zeros enter at the border).

    Implemented as one pad per element whose negative side crops, so the backward pass only touches
    that element's voxels (slicing a padded batch would materialise a full-size gradient per element).
    """
    if n <= 0:
        return x
    out = []
    for xb, g in zip(x.split(1), gens):
        dx, dy, dz = (int(v) - n for v in torch.randint(0, 2 * n + 1, (3,), generator=g))
        out.append(F.pad(xb, (dz, -dz, dy, -dy, dx, -dx)))
    return torch.cat(out)


def random_affine(x: torch.Tensor, gens: list, scale: float = 0.0, degrees: float = 0.0) -> torch.Tensor:
    """Random isotropic scaling in ``1 ± scale`` and rotation of up to ``degrees`` about each axis (trilinear)."""
    if scale <= 0 and degrees <= 0:
        return x
    thetas = []
    for g in gens:
        u = torch.rand(4, generator=g) * 2 - 1
        s = 1.0 + scale * float(u[0])
        ang = [math.radians(degrees * float(a)) for a in u[1:]]
        rot = torch.eye(3)
        for axis, a in enumerate(ang):
            c, si = math.cos(a), math.sin(a)
            i, j = [k for k in range(3) if k != axis]
            r = torch.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -si, si, c
            rot = rot @ r
        thetas.append(torch.cat([rot / s, torch.zeros(3, 1)], 1))
    theta = torch.stack(thetas).to(x.dtype).to(x.device)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    r = max(1, int(math.ceil(truncate * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3D Gaussian blur (sigma in voxels) of ``(B, C, X, Y, Z)``; zero padding."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma).to(x.device, x.dtype)
    r = (len(k) - 1) // 2
    C = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = len(k)
        w = k.view(1, 1, *shape).repeat(C, 1, 1, 1, 1)
        pad = [0, 0, 0]
        pad[axis] = r
        x = F.conv3d(x, w, padding=tuple(pad), groups=C)
    return x
