import numpy as np
import pandas as pd
import pytest

from brainfv.data.lesions import lesion_profile
from brainfv.report.metrics import best_template_match, lesion_templates, quality_ratios, sex_effect_fidelity


def test_perfect_lesion_scores_top_and_noise_near_zero():
    vs = 3.0
    templates = lesion_templates(["sphere", "cross"], [12.0], vs)
    vol = np.zeros((30, 30, 30))
    prof, half = lesion_profile("sphere", 6.0, vs)
    vol[10 - half:10 + half + 1, 12 - half:12 + half + 1, 15 - half:15 + half + 1] -= prof
    m = best_template_match(vol, templates)
    assert m["ncc"] > 0.99 and m["shape"] == "sphere" and m["position"] == (10, 12, 15)
    prof, half = lesion_profile("cross", 6.0, vs)
    vol2 = np.zeros((30, 30, 30))
    vol2[15 - half:15 + half + 1, 15 - half:15 + half + 1, 15 - half:15 + half + 1] -= prof
    assert best_template_match(vol2, templates)["shape"] == "cross"
    noise = np.random.default_rng(0).normal(size=(30, 30, 30))
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(noise, 0.5)
    assert best_template_match(smooth, lesion_templates(["sphere"], [12.0], vs))["ncc"] < 0.6
    # a bright blob is the opposite of a (dark) lesion
    assert best_template_match(-vol, lesion_templates(["sphere"], [12.0], vs))["ncc"] < 0.3


def test_sex_effect_fidelity_and_quality():
    rng = np.random.default_rng(1)
    effect = rng.normal(size=(10, 10, 10))
    mask = np.ones_like(effect, bool)
    assert sex_effect_fidelity(effect * 3, effect, mask, +1) == pytest.approx(1.0)
    assert sex_effect_fidelity(effect, effect, mask, -1) == pytest.approx(-1.0)
    assert abs(sex_effect_fidelity(rng.normal(size=effect.shape), effect, mask)) < 0.2
    q = quality_ratios(effect, 1.0, 1.0, mask)
    assert q["tv_ratio"] > 0 and q["hf_ratio"] > 0


def png_size(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path).shape


def test_figures_render(tmp_path):
    from brainfv.report import figures as F

    rng = np.random.default_rng(0)
    shape = (20, 24, 20)
    mask = np.zeros(shape, bool)
    mask[3:17, 3:21, 3:17] = True
    vols = {r: rng.normal(size=(3,) + shape).astype(np.float32) for r in ("none", "fourier")}
    size = F.featviz_grid_figure(vols, [0, 1, 2], ["a:0", "a:1", "a:2"], mask, tmp_path / "grid.png", "t")
    h, w = png_size(tmp_path / "grid.png")[:2]
    assert abs(w - size[0]) <= 2 and abs(h - size[1]) <= 2 and h > w * 0.5  # 3 rows x 2 columns
    rows = []
    for task in ("sex", "lesion"):
        for r in ("none", "fourier"):
            for u in range(3):
                rows.append({"task": task, "layer": "b2", "regularizer": r, "unit": u,
                             "activation_ratio": rng.random(), "stability": rng.random(), "real_max": 1.0,
                             "lesion_ncc": rng.random() if task == "lesion" else np.nan})
    table = pd.DataFrame(rows)
    F.metrics_figure(table, tmp_path / "m.png")
    h, w = png_size(tmp_path / "m.png")[:2]
    assert h > 300 and w > 500
    traj = pd.DataFrame([{**r, "step": s, "objective": s * 0.1} for r in rows for s in (0, 4, 8)])
    F.trajectories_figure(traj[["task", "layer", "regularizer", "unit", "step", "objective"]], table,
                          tmp_path / "t.png")
    assert png_size(tmp_path / "t.png")[0] > 200
