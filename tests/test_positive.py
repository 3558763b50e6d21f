"""Positive-control networks: the study's architecture with a known preferred input, recovered on a tiny grid."""
import numpy as np
import pytest
import torch

from brainfv.errors import ConfigError
from brainfv.featviz.render import render
from brainfv.featviz.study import make_objective
from brainfv.models.positive import known_pattern, lesion_positions, lesion_template_kernel, positive_control_network

SHAPE = (32, 32, 32)
ARCH = {"channels": [2, 2], "dropout": 0.0}


def ball(centre, d=4.0, depth=-2.0):
    g = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    x = np.zeros(SHAPE, np.float32)
    x[np.linalg.norm(g - np.asarray(centre), axis=-1) <= d / 2] = depth
    return x


def logit(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)[None, None]).numpy()[0]


def test_template_kernel_is_balanced_and_dark_centred():
    k = lesion_template_kernel(5)
    assert abs(k.sum()) < 1e-6 and abs(np.linalg.norm(k) - 1) < 1e-5
    c = k.shape[0] // 2
    assert k[c, c, c] < 0 and k[0, 0, 0] == 0


def test_lesion_positions_follow_the_planted_frequency():
    f = np.zeros(SHAPE)
    f[20:24, 4:8, 8:12] = 1.0  # cell (5, 1, 2) of 4-voxel cells
    f[0:4, 0:4, 0:4] = 0.3
    assert lesion_positions(f, 2, k=2) == [(5, 1, 2), (0, 0, 0)]


@pytest.mark.parametrize("hidden", [0, 6])
def test_positive_control_prefers_dark_lesions_where_built_to(hidden):
    pos = [(5, 1, 2)]
    flat = positive_control_network({**ARCH, "head": "flatten", "hidden": hidden}, SHAPE, 4.0, pos)
    pool = positive_control_network({**ARCH, "head": "pool", "hidden": hidden}, SHAPE, 4.0)
    inside, outside = ball((21.5, 5.5, 9.5)), ball((9.5, 21.5, 21.5))
    blank = np.zeros(SHAPE, np.float32)
    # flatten head: a dark lesion counts only inside the read cell; pooled head: anywhere alike
    assert logit(flat, inside)[1] > logit(flat, blank)[1] + 0.1
    assert abs(logit(flat, outside)[1] - logit(flat, blank)[1]) < 1e-6
    assert logit(pool, inside)[1] > logit(pool, blank)[1] + 0.01
    assert np.isclose(logit(pool, inside)[1], logit(pool, outside)[1], rtol=1e-4)
    # a dark ball is preferred to a bright one (whose rim alone matches the template's shell); 'absent' is constant
    assert logit(flat, inside)[1] > 1.5 * logit(flat, -inside)[1]
    assert logit(flat, inside)[0] == logit(flat, blank)[0]
    with pytest.raises(ConfigError, match="positions"):
        positive_control_network({**ARCH, "head": "flatten"}, SHAPE, 4.0)


def test_positive_control_pattern_recovered_by_activation_maximization():
    """Optimising the 'present' logit of the flatten-head control on a bounded image puts its darkest,
    lesion-like blob inside the read cell (the known where)."""
    pos = [(5, 1, 2)]
    net = positive_control_network({**ARCH, "head": "flatten"}, SHAPE, 4.0, pos)
    res = render(net, make_objective("classifier", [1], "channel"), SHAPE,
                 {"range": "tanh", "bound": 2.0, "mask": False}, steps=48, lr=0.1, seeds=[0])
    img = res.images[0]
    region = known_pattern(SHAPE, 4.0, pos, n_blocks=2).astype(bool)
    k = lesion_template_kernel(4.0)
    from scipy.ndimage import correlate
    resp = correlate(img, k, mode="constant")
    best = np.unravel_index(np.argmax(resp), SHAPE)
    assert region[best], (best, np.argwhere(region).min(0), np.argwhere(region).max(0))
    # beyond the read cell's receptive field (the cell grown by the kernels' reach) the image stays unstructured
    from scipy.ndimage import binary_dilation
    far = ~binary_dilation(region, iterations=6)
    assert resp[region].max() > 5 * max(resp[far].max(), 1e-6)
