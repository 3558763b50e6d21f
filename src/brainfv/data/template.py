"""The MNI152 template that nilearn ships (1 mm, skull-stripped), brought onto a study grid."""
from __future__ import annotations

import functools

import numpy as np
from nilearn import datasets

from .grid import Grid

__all__ = ["template_on_grid"]


@functools.lru_cache(maxsize=4)
def _template_1mm():
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    return t1, gm, wm, mask


@functools.lru_cache(maxsize=4)
def template_on_grid(grid: Grid) -> dict:
    """The template T1 (0..1), GM and WM probabilities and the brain mask on ``grid``.

    Returns a dict of float32 arrays ``t1, gm, wm`` and a bool array ``mask`` (cached per grid:
    treat as read-only).
    """
    t1, gm, wm, mask = _template_1mm()
    out = {
        "t1": grid.resample_image(t1),
        "gm": np.clip(grid.resample_image(gm), 0, 1),
        "wm": np.clip(grid.resample_image(wm), 0, 1),
    }
    out["mask"] = grid.resample_image(mask) > 0.5
    out["t1"] = np.where(out["mask"], out["t1"], 0).astype(np.float32)
    return out
