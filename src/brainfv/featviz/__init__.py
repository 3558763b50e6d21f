"""3D activation maximization for any ``nn.Module``.

Pieces compose as in Lucid/Lucent ``optvis``, in 3D and batched over units:

- :mod:`~brainfv.featviz.units`        address units as ``layer:channel``, capture (and truncate at) layers
- :mod:`~brainfv.featviz.param`        voxel, Fourier (1/f^decay) and MACO (phase-only) parametrisations
- :mod:`~brainfv.featviz.transforms`   jitter, random scale/rotation, Gaussian blur (differentiable, seeded)
- :mod:`~brainfv.featviz.regularizers` L1, L2, total variation, frequency penalty; presets from config
- :mod:`~brainfv.featviz.objectives`   channel, neuron, class logit/probability/contrast; ``+``, ``*``, ``-``
- :mod:`~brainfv.featviz.crop`         receptive-field crops planned from an objective's footprint
- :mod:`~brainfv.featviz.simplify`     a frozen copy of the network with BatchNorm folded, activations moved
- :mod:`~brainfv.featviz.render`       the batched optimisation loop (one batch element per unit)
- :mod:`~brainfv.featviz.metrics`      image statistics of the results

Example::

    from brainfv.featviz import render, objectives
    obj = objectives.channel("block3.norm", [0, 1, 2, 3])
    res = render(model, obj, shape=(52, 64, 52), preset={"param": "fourier", "jitter": 3}, steps=256,
                 real_volumes=volumes, mask=brain_mask)  # range: data takes the intensity range from them
    res.images  # (4, 52, 64, 52), inside the brain voxels' [0.5, 99.5] percentiles
    res.info["converged"], res.info["steps_run"]  # the plateau criterion per element
"""
from ..config import Preset  # noqa: F401
from . import objectives  # noqa: F401
from .render import Pieces, RenderResult, optimize, preset_pieces, render  # noqa: F401
from .units import capture_activations, get_module, parse_unit  # noqa: F401
