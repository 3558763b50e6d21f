"""Image statistics of visualizations (and of real volumes, for comparison)."""
from __future__ import annotations

import numpy as np
import torch

from .param import frequencies
from .regularizers import total_variation

__all__ = ["relative_tv", "high_frequency_fraction", "energy_inside", "image_stats", "correlation",
           "partial_correlation"]


def relative_tv(vol: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Roughness: the mean absolute neighbour difference (total variation with ``power=1``, averaged over
    the three axes) divided by the volume's standard deviation (inside ``mask``): scale-free."""
    v = np.asarray(vol, dtype=np.float64)
    sd = v[mask].std() if mask is not None else v.std()
    if sd == 0:
        return 0.0
    return float(total_variation(torch.from_numpy(v)[None], power=1)[0]) / 3 / sd


def high_frequency_fraction(vol: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of spectral power above ``cutoff`` cycles/voxel (0.5 = Nyquist)."""
    v = np.asarray(vol, dtype=np.float64)
    p = np.abs(np.fft.rfftn(v - v.mean())) ** 2
    f = frequencies(v.shape).double().numpy()
    total = p.sum()
    return float(p[f > cutoff].sum() / total) if total > 0 else 0.0


def energy_inside(vol: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the squared signal inside ``mask``."""
    e = np.asarray(vol, dtype=np.float64) ** 2
    total = e.sum()
    return float(e[mask].sum() / total) if total > 0 else 0.0


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two volumes (inside ``mask``); NaN where it is undefined (a constant volume:
    no measured 0), so summaries count such cases instead of averaging them in."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = np.sqrt((a ** 2).sum() * (b ** 2).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def partial_correlation(a: np.ndarray, b: np.ndarray, covariate: np.ndarray | None,
                        mask: np.ndarray | None = None) -> float:
    """Correlation of ``a`` and ``b`` (inside ``mask``) with ``covariate`` partialled out of both (each
    residualised on an intercept and the covariate by least squares): e.g. a visualization's darkness against
    where lesions were planted, beyond what white-matter probability alone explains. NaN where undefined;
    without a covariate (None), the plain :func:`correlation`."""
    if covariate is None:
        return correlation(a, b, mask)
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, covariate))
    if mask is not None:
        a, b, c = a[mask], b[mask], c[mask]
    design = np.stack([np.ones(a.size), c.ravel()], 1)
    res = [y.ravel() - design @ np.linalg.lstsq(design, y.ravel(), rcond=None)[0] for y in (a, b)]
    return correlation(res[0], res[1])


def image_stats(vol: np.ndarray, mask: np.ndarray | None = None) -> dict:
    return {"total_variation": relative_tv(vol, mask), "high_freq_fraction": high_frequency_fraction(vol),
            "energy_inside_mask": energy_inside(vol, mask) if mask is not None else float("nan"),
            "std": float(np.asarray(vol).std()), "max_abs": float(np.abs(vol).max())}
