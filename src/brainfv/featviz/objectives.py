"""Objectives: functions of captured activations giving one value per batch element (to maximise).

Batched over units: element ``b`` of the batch is scored on ``channels[b]``. Objectives use
*signed* activations (maximising ``|ELU|`` has a trivial saturated optimum). They compose::

    obj = channel("block3.norm", [0, 1]) - 0.5 * channel("block2.norm", [4, 4])
"""
from __future__ import annotations

import torch

__all__ = ["Objective", "channel", "neuron", "class_logit", "class_probability"]


class Objective:
    """``fn(acts, rows) -> (B,)`` and the layers it reads.

    ``rows`` (a slice, optional) says which elements of the full batch the activations belong
    to, so the loop can evaluate the batch in chunks and still score element ``b`` on its own unit.
    """

    def __init__(self, fn, layers, name="objective", kind="other", info=None):
        self.fn, self.layers, self.name, self.kind = fn, list(layers), name, kind
        self.info = info or {}

    def __call__(self, acts, rows=None):
        return self.fn(acts, rows)

    def __add__(self, other):
        if isinstance(other, (int, float)):
            return Objective(lambda a, r=None: self(a, r) + other, self.layers, f"{self.name}+{other}")
        return Objective(lambda a, r=None: self(a, r) + other(a, r), self.layers + other.layers,
                         f"{self.name}+{other.name}")

    __radd__ = __add__

    def __neg__(self):
        return Objective(lambda a, r=None: -self(a, r), self.layers, f"-{self.name}", self.kind, self.info)

    def __sub__(self, other):
        return self + (-other)

    def __mul__(self, other):
        if isinstance(other, (int, float)):
            return Objective(lambda a, r=None: other * self(a, r), self.layers, f"{other}*{self.name}", self.kind,
                             self.info)
        return Objective(lambda a, r=None: self(a, r) * other(a, r), self.layers + other.layers,
                         f"{self.name}*{other.name}")

    __rmul__ = __mul__


def _channels(channels, b, device, rows=None):
    if isinstance(channels, int):
        return torch.full((b,), channels, dtype=torch.long, device=device)
    ch = list(channels)
    if isinstance(rows, slice):
        ch = ch[rows]
    elif rows is not None:  # explicit element indices (e.g. a chunk padded with repeats)
        ch = [ch[r] for r in rows]
    idx = torch.as_tensor(ch, dtype=torch.long, device=device)
    if len(idx) != b:
        raise ValueError(f"{len(idx)} channels for a batch of {b}")
    return idx


def _pick(act, channels, rows=None):
    idx = _channels(channels, act.shape[0], act.device, rows)
    return act[torch.arange(act.shape[0], device=act.device), idx]


def channel(layer, channels):
    """Mean activation of feature map ``channels[b]`` of ``layer`` (for Linear layers: the output itself)."""
    def fn(acts, rows=None):
        a = _pick(acts[layer].float(), channels, rows)
        return a.flatten(1).mean(1) if a.dim() > 1 else a
    return Objective(fn, [layer], f"channel({layer})", "channel", {"layer": layer, "channels": channels})


def neuron(layer, channels, position=None):
    """Activation of channel ``channels[b]`` at one spatial ``position`` (default: the centre)."""
    def fn(acts, rows=None):
        a = _pick(acts[layer].float(), channels, rows)
        pos = position if position is not None else tuple(s // 2 for s in a.shape[1:])
        return a[(slice(None),) + tuple(pos)]
    return Objective(fn, [layer], f"neuron({layer})", "neuron",
                     {"layer": layer, "channels": channels, "position": position})


def class_logit(channels, layer="classifier"):
    """The logit of class ``channels[b]``."""
    return channel(layer, channels)


def class_probability(channels, layer="classifier"):
    """The softmax probability of class ``channels[b]``."""
    def fn(acts, rows=None):
        return _pick(torch.softmax(acts[layer].float(), 1), channels, rows)
    return Objective(fn, [layer], f"probability({layer})", "probability", {"layer": layer, "channels": channels})
