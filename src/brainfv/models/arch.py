"""Torch-free description of the paper-style CNN's layers, so the DAG can list units cheaply.

The model (:class:`brainfv.models.cnn.BrainCNN`) names its modules::

    block{i}.conv  block{i}.norm  block{i}.act  block{i}.pool     i = 1..len(channels)
    fc  fc_act                                                    if hidden > 0
    classifier                                                    n_classes units (logits)

A unit is addressed as ``layer:channel``, e.g. ``block3.norm:12`` or ``classifier:1``.
"""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError, UnitError

__all__ = ["layer_units", "n_units", "resolve_units"]


def layer_units(arch: dict | ModelConfig | None, n_classes: int = 2) -> dict[str, int]:
    """``{layer name: number of units}`` for every addressable layer of the architecture (config ``model``;
    the classifier's units are the classes, known once the data is: ``n_classes``)."""
    a = ModelConfig.from_config({k: v for k, v in (arch or {}).items() if k != "n_classes"}, "model")
    out = {}
    for i, c in enumerate(a.channels, start=1):
        for part in ("conv", "norm", "act", "pool"):
            out[f"block{i}.{part}"] = int(c)
    if a.hidden:
        out["fc"] = out["fc_act"] = int(a.hidden)
    n = (arch or {}).get("n_classes", n_classes)
    out["classifier"] = int(n) if n is not None else None  # None: known only from the data
    return out


def n_units(arch: dict | ModelConfig | None, layer: str) -> int:
    units = layer_units(arch)
    if layer not in units:
        raise UnitError(f"layer {layer!r} is not in the model; layers: {list(units)}")
    return units[layer]


def resolve_units(spec: str | int | list[int], n: int, where: str = "units") -> list[int]:
    """Unit indices from a config spec: ``"all"``, an int N (first N) or a list of indices (sorted, without
    repeats: a request's volumes and table rows are in ascending channel order)."""
    if spec == "all":
        return list(range(n))
    if isinstance(spec, bool):
        raise ConfigError(f"{where}: expected 'all', a count or a list of channels, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ConfigError(f"{where}: unit count must be >= 1, got {spec}")
        return list(range(min(spec, n)))
    if isinstance(spec, (list, tuple)):
        bad = [u for u in spec if not (isinstance(u, int) and 0 <= u < n)]
        if bad:
            raise ConfigError(f"{where}: channels {bad} out of range 0..{n - 1}")
        return sorted(set(spec))
    raise ConfigError(f"{where}: expected 'all', a count or a list of channels, got {spec!r}")
