"""Objectives: functions of captured activations giving one value per batch element (to maximise).

Batched over units: element ``b`` of the batch is scored on ``channels[b]``. Objectives use
*signed* activations (maximising ``|ELU|`` has a trivial saturated optimum). They compose with
``+``, ``-``, ``*`` (by numbers or other objectives)::

    obj = channel("block3.norm", [0, 1]) - 0.5 * channel("block2.norm", [4, 4])

The loop never looks inside an objective. What it may know is declared by the objective and
carried through every operator:

- ``layers``: the layers it reads (the forward pass can stop after the deepest);
- ``units``: ``(layer, channels)`` pairs, to check channels exist;
- ``batch``: how many batch elements it addresses (the length of its channel lists);
- ``footprint``: for each layer, the positions it reads (``None`` inside the list: the map's centre),
  or ``None`` when it reads whole maps. A receptive-field crop (:mod:`brainfv.featviz.crop`) is only
  planned when every position is known, and it passes the objective an :class:`Activations` mapping
  that says where each cropped map sits in the full volume's map, so a neuron objective finds its
  position whatever operators surround it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Activations", "Objective", "channel", "neuron", "class_logit", "class_probability", "class_contrast"]


class Activations(dict):
    """``{layer: activation tensor}``; with a crop, also each map's origin and shape in the full volume.

    ``origin(layer)`` is the index, in the full volume's activation map, of the first element of the
    (cropped) map held here; ``full_shape(layer)`` the spatial shape of the full volume's map.
    """

    def __init__(self, acts, origins=None, full_shapes=None):
        super().__init__(acts)
        self._origins = dict(origins or {})
        self._full = dict(full_shapes or {})

    def origin(self, layer: str) -> tuple:
        return self._origins.get(layer, (0,) * (self[layer].dim() - 2))

    def full_shape(self, layer: str) -> tuple:
        return tuple(self._full.get(layer, tuple(self[layer].shape[2:])))


def _merge_footprints(a, b):
    if a is None or b is None:
        return None
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, [])
        out[k] += [p for p in v if p not in out[k]]
    return out


def _merge_batch(a, b, name):
    if a is not None and b is not None and a != b:
        raise ValueError(f"objective {name}: its parts address {a} and {b} batch elements")
    return a if a is not None else b


class Objective:
    """``fn(acts, rows) -> (B,)`` plus what it reads (see the module docstring).

    ``rows`` (a slice or index list, optional) says which elements of the full batch the
    activations belong to, so the loop can evaluate the batch in chunks and still score element
    ``b`` on its own unit.
    """

    def __init__(self, fn, layers, name="objective", units=(), batch=None, footprint=None):
        self.fn, self.layers, self.name = fn, list(dict.fromkeys(layers)), name
        self.units, self.batch, self.footprint = list(units), batch, footprint

    def __call__(self, acts, rows=None):
        if not isinstance(acts, Activations):
            acts = Activations(acts)
        return self.fn(acts, rows)

    def __repr__(self):
        return f"Objective({self.name})"

    def _combine(self, other, fn, name):
        return Objective(fn, self.layers + other.layers, name, self.units + other.units,
                         _merge_batch(self.batch, other.batch, name),
                         _merge_footprints(self.footprint, other.footprint))

    def _same(self, fn, name):
        return Objective(fn, self.layers, name, self.units, self.batch, self.footprint)

    def __add__(self, other):
        if isinstance(other, (int, float)):
            return self._same(lambda a, r=None: self(a, r) + other, f"{self.name}+{other}")
        return self._combine(other, lambda a, r=None: self(a, r) + other(a, r), f"{self.name}+{other.name}")

    __radd__ = __add__

    def __neg__(self):
        return self._same(lambda a, r=None: -self(a, r), f"-{self.name}")

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, (int, float)):
            return self._same(lambda a, r=None: other * self(a, r), f"{other}*{self.name}")
        return self._combine(other, lambda a, r=None: self(a, r) * other(a, r), f"{self.name}*{other.name}")

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


def _batch_of(channels):
    return None if isinstance(channels, int) else len(list(channels))


def _units(layer, channels):
    return [(layer, [channels] if isinstance(channels, int) else list(channels))]


def channel(layer: str, channels: int | Sequence[int]) -> Objective:
    """Mean activation of feature map ``channels[b]`` of ``layer`` (for Linear layers: the output itself)."""
    def fn(acts, rows=None):
        a = _pick(acts[layer].float(), channels, rows)
        return a.flatten(1).mean(1) if a.dim() > 1 else a
    return Objective(fn, [layer], f"channel({layer})", _units(layer, channels), _batch_of(channels), None)


def neuron(layer: str, channels: int | Sequence[int], position: tuple | None = None) -> Objective:
    """Activation of channel ``channels[b]`` at one spatial ``position`` of the full volume's map
    (default: its centre)."""
    def fn(acts, rows=None):
        a = _pick(acts[layer].float(), channels, rows)
        full = acts.full_shape(layer)
        pos = tuple(position) if position is not None else tuple(s // 2 for s in full)
        local = tuple(int(p) - int(o) for p, o in zip(pos, acts.origin(layer)))
        if any(not 0 <= q < n for q, n in zip(local, a.shape[1:])):
            raise ValueError(f"neuron({layer}) at {pos} lies outside the evaluated map (origin "
                             f"{acts.origin(layer)}, shape {tuple(a.shape[1:])})")
        return a[(slice(None),) + local]
    return Objective(fn, [layer], f"neuron({layer})", _units(layer, channels), _batch_of(channels),
                     {layer: [None if position is None else tuple(position)]})


def class_logit(channels: int | Sequence[int], layer: str = "classifier") -> Objective:
    """The logit of class ``channels[b]``."""
    return channel(layer, channels)


def class_probability(channels: int | Sequence[int], layer: str = "classifier") -> Objective:
    """The softmax probability of class ``channels[b]``."""
    def fn(acts, rows=None):
        return _pick(torch.softmax(acts[layer].float(), 1), channels, rows)
    return Objective(fn, [layer], f"probability({layer})", _units(layer, channels), _batch_of(channels), None)


def class_contrast(channels: int | Sequence[int], layer: str = "classifier",
                   others: Sequence[int] | None = None) -> Objective:
    """Logit of class ``channels[b]`` minus the logit of class ``others[b]`` (default: the mean of the other
    classes' logits; with two classes, male − female): what separates the classes rather than what raises
    one logit (two logits need not mirror each other)."""
    if others is not None:
        return class_logit(channels, layer) - class_logit(others, layer)

    def fn(acts, rows=None):
        z = acts[layer].float()
        own = _pick(z, channels, rows)
        rest = (z.sum(1) - own) / max(z.shape[1] - 1, 1)
        return own - rest
    return Objective(fn, [layer], f"contrast({layer})", _units(layer, channels), _batch_of(channels), None)
