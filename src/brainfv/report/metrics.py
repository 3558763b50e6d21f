"""Comparison metrics: how well a visualization reveals the known ground truth, and how good it is.

Each metric is defined once here, documented, and tested on constructed volumes where the right
answer is known (a perfect sphere scores top, noise scores near zero).
"""
from __future__ import annotations

import numpy as np

from ..featviz.metrics import correlation, high_frequency_fraction, relative_tv

__all__ = ["lesion_templates", "best_template_match", "sex_effect_fidelity", "quality_ratios"]


def lesion_templates(shapes, diameters_mm, voxel_size, edge_mm=1.0):
    """Hypo-intense lesion templates (negative profiles) of each shape at each diameter."""
    from ..data.lesions import lesion_profile

    out = []
    for shape in shapes:
        for d in diameters_mm:
            prof, _ = lesion_profile(shape, d / 2, voxel_size, edge_mm)
            out.append((shape, float(d), -prof))
    return out


def _local_ncc(vol, template, mask=None):
    """Normalised cross-correlation of ``template`` with every position of ``vol`` (same size output)."""
    from scipy import ndimage, signal

    t = template - template.mean()
    tn = np.sqrt((t ** 2).sum())
    if tn == 0:
        return np.zeros_like(vol)
    n = t.size
    num = signal.fftconvolve(vol, t[::-1, ::-1, ::-1], mode="same")
    size = template.shape
    s1 = ndimage.uniform_filter(vol, size, mode="constant") * n
    s2 = ndimage.uniform_filter(vol ** 2, size, mode="constant") * n
    var = np.maximum(s2 - s1 ** 2 / n, 0)
    den = np.sqrt(var) * tn
    eps = 1e-6 * (den.max() if den.size else 1)
    ncc = np.where(den > eps, num / np.maximum(den, eps), 0.0)
    if mask is not None:
        ncc = np.where(mask, ncc, 0.0)
    return np.clip(ncc, -1, 1)


def best_template_match(vol, templates, mask=None):
    """Best normalised cross-correlation of ``vol`` with any template at any position.

    Returns ``{"ncc", "shape", "diameter_mm", "position"}``. ``templates`` come from
    :func:`lesion_templates` (hypo-intense). A volume containing exactly one of the
    templates scores 1 at its position; noise scores near 0 (for templates of many voxels).
    """
    vol = np.asarray(vol, dtype=np.float64)
    best = {"ncc": -1.0, "shape": None, "diameter_mm": float("nan"), "position": None}
    for shape, d, t in templates:
        ncc = _local_ncc(vol, t, mask)
        i = int(np.argmax(ncc))
        if ncc.flat[i] > best["ncc"]:
            best = {"ncc": float(ncc.flat[i]), "shape": shape, "diameter_mm": d,
                    "position": tuple(int(v) for v in np.unravel_index(i, vol.shape))}
    return best


def sex_effect_fidelity(vis, effect, mask, sign=1.0):
    """Correlation (inside ``mask``) of a visualization with the planted sex-effect map × ``sign``.

    ``sign`` is +1 for the male logit (effect = male − female) and −1 for the female logit.
    """
    return correlation(np.asarray(vis) * sign, effect, mask)


def quality_ratios(vis, real_tv, real_hf, mask=None):
    """Total variation and high-frequency share of ``vis`` divided by those of real volumes (1 = real-like)."""
    return {"tv_ratio": relative_tv(vis, mask) / real_tv if real_tv else float("nan"),
            "hf_ratio": high_frequency_fraction(vis) / real_hf if real_hf else float("nan")}
