"""brainfv: feature visualization for 3D CNNs trained on structural brain MRI.

The package is split into small modules that import their heavy dependencies
lazily, so a rule's conda environment only needs what its stage uses:

- :mod:`brainfv.data`     grid, on-disk store, cohort sources, artificial lesions
- :mod:`brainfv.models`   the paper-style 3D CNN with addressable layers
- :mod:`brainfv.training` streaming training, evaluation and checkpoints
- :mod:`brainfv.featviz`  3D activation maximization (parametrisations,
  transforms, regularizers, objectives, the batched optimisation loop, metrics)
- :mod:`brainfv.report`   comparison metrics and figures
"""

__version__ = "0.1.0"
