"""Control networks for the sanity checks of feature visualization.

Adebayo et al. (2018)'s model-randomization check, as a *cascade*: the network's layers are re-initialised
from the top (output) layer down, cumulatively, and the visualization is repeated after each step; a method
whose output survives the randomization of the layers that compute a unit shows the method, not what the
network learned. :func:`cascade` gives the whole cascade (for the metric along it), :func:`randomized_copy`
its last step (every layer randomized: the study's ``randomized`` control).

What is randomized: every parameter, by its module's own initialiser (``reset_parameters``), drawn from a
seed that depends on ``seed`` and the stage's name only, so a stage gets the same random weights at every
step of the cascade and in :func:`randomized_copy`. BatchNorm *running statistics* are kept: they are not
weights the network learned by gradient but statistics of its inputs, and resetting them to mean 0 and
variance 1 would rescale every activation by the data's spread, a second intervention mixed into the
randomization (Adebayo et al. randomize the weights; the BatchNorm affine weight and bias are re-initialised
like every parameter).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..utils import stable_seed

__all__ = ["cascade_stages", "randomize_stages", "cascade", "randomized_copy"]


def cascade_stages(model: nn.Module) -> list[str]:
    """The stages of the cascade, bottom (input side) to top: the names of the top-level children that hold
    parameters, in registration order (a model that keeps every parameter in one child is looked into, until
    there are at least two stages). For :class:`~brainfv.models.BrainCNN`: ``block1 … blockN`` and the head."""
    prefix, mod = "", model
    while True:
        stages = [n for n, c in mod.named_children() if any(True for _ in c.parameters())]
        if len(stages) != 1:
            return [prefix + n for n in stages] if stages else ([prefix.rstrip(".")] if prefix else [])
        prefix, mod = prefix + stages[0] + ".", getattr(mod, stages[0])


def _get(model, name):
    mod = model
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


@torch.no_grad()
def _randomize(stage, seed):
    reset = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for m in stage.modules():
            if hasattr(m, "reset_parameters"):
                buffers = {k: b.clone() for k, b in m.named_buffers(recurse=False)}
                m.reset_parameters()  # BatchNorm's also resets its running statistics: put them back
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)
                reset |= {id(p) for p in m.parameters(recurse=False)}
        for p in stage.parameters():  # parameters of modules without their own initialiser: redraw, same spread
            if id(p) not in reset:
                sd = float(p.std()) if p.numel() > 1 else 1.0
                p.normal_(0.0, sd if sd > 0 else 1.0)


def randomize_stages(model: nn.Module, stages: Sequence[str], seed: int) -> nn.Module:
    """A copy of ``model`` with the parameters of ``stages`` (names from :func:`cascade_stages`) re-initialised;
    the caller's model and the global RNG are untouched."""
    net = copy.deepcopy(model)
    for name in stages:
        _randomize(_get(net, name), stable_seed(int(seed), "randomize", name))
    return net.eval()


def cascade(model: nn.Module, seed: int) -> list[tuple[list[str], nn.Module]]:
    """Adebayo et al.'s cascading randomization: a list of ``(stages randomized, model)``, the first with the
    top stage randomized, each next one also the stage below, the last with every stage randomized (equal to
    :func:`randomized_copy` with the same seed). Stages keep their weights in every step below their turn
    (bit-identical to the trained model's)."""
    stages = cascade_stages(model)
    out = []
    for k in range(1, len(stages) + 1):
        top = stages[::-1][:k]
        out.append((top, randomize_stages(model, top, seed)))
    return out


def randomized_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every stage's parameters re-initialised (each module's own
    ``reset_parameters``), drawn from ``seed``, running statistics kept (see the module docstring); the
    caller's model and the global RNG are untouched. Modules without parameters are unaffected.

    Parameters whose module has no initialiser — every parameter of a TorchScript model, which keeps no
    Python modules — are redrawn from a normal distribution with their own tensor's spread (a constant
    tensor, e.g. a BatchNorm weight of ones, from N(0, 1)). That is a randomization, but not the
    architecture's own initialisation: for a model you give as TorchScript, read the check with this in mind
    (a state dict with its architecture is re-initialised exactly)."""
    return randomize_stages(model, cascade_stages(model), seed)
