"""Control networks for the sanity checks of feature visualization.

:func:`randomized_copy` is Adebayo et al. (2018)'s model-randomization check: the same architecture with
re-initialised weights (seeded). A visualization method whose output looks the same for the trained and
the randomized network shows the method, not what the network learned.
"""
from __future__ import annotations

import copy

import torch

__all__ = ["randomized_copy"]


def randomized_copy(model, seed):
    """A copy of ``model`` with every parameter and buffer re-initialised (each module's own
    ``reset_parameters``/``reset_running_stats``), drawn from ``seed``; the caller's model and the global
    RNG are untouched. Modules without parameters are unaffected.

    Parameters whose module has no initialiser — every parameter of a TorchScript model, which keeps no
    Python modules — are redrawn from a normal distribution with their own tensor's spread (a constant
    tensor, e.g. a BatchNorm weight of ones, from N(0, 1)); buffers of such models (running statistics) are
    kept. That is a randomization, but not the architecture's own initialisation: for a model you give as
    TorchScript, read the check with this in mind (a state dict with its architecture is re-initialised
    exactly)."""
    net = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        reset = set()
        for m in net.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
                reset |= {id(p) for p in m.parameters(recurse=False)}
        for p in net.parameters():  # parameters of modules without their own initialiser: redraw, same spread
            if id(p) not in reset:
                sd = float(p.std()) if p.numel() > 1 else 1.0
                p.normal_(0.0, sd if sd > 0 else 1.0)
    return net.eval()
