"""Units addressed by module name and channel; capturing activations with early stop."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnitError

__all__ = ["parse_unit", "get_module", "capture_activations", "layer_output_shape", "check_channels"]


def parse_unit(address):
    """``"block3.conv:12"`` → ``("block3.conv", 12)``."""
    layer, sep, ch = str(address).rpartition(":")
    if not sep or not layer or not ch.lstrip("-").isdigit():
        raise UnitError(f"unit address {address!r} must look like 'layer:channel', e.g. 'block3.conv:12'")
    return layer, int(ch)


def get_module(model, name):
    """The submodule called ``name``; the error lists the model's module names."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise UnitError(f"layer {name!r} is not in the model ({type(model).__name__}); its layers are: "
                        f"{', '.join(names)}")
    return modules[name]


class _Stop(Exception):
    pass


def capture_activations(model, x, layers, truncate=True):
    """Run ``model(x)`` and return ``{layer: output}`` for ``layers``.

    With ``truncate`` the forward pass stops as soon as every requested layer has
    produced its output, so no work is spent on deeper layers. Works on any
    ``nn.Module`` (the layers are found by name and observed with forward hooks).
    """
    layers = list(dict.fromkeys(layers))
    acts = {}
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            acts[name] = output
            if truncate and len(acts) == len(layers):
                raise _Stop

        return hook

    try:
        for name in layers:
            handles.append(get_module(model, name).register_forward_hook(hook_for(name)))
        try:
            model(x)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in acts]
    if missing:
        raise UnitError(f"layers {missing} were not run by the model's forward pass")
    return acts


@torch.no_grad()
def layer_output_shape(model, layer, input_shape, device="cpu"):
    """Shape (without batch) of ``layer``'s output for one input of ``input_shape`` (C, X, Y, Z)."""
    x = torch.zeros((1,) + tuple(input_shape), device=device)
    return tuple(capture_activations(model, x, [layer])[layer].shape[1:])


def check_channels(model, layer, channels, input_shape, device="cpu"):
    """Raise :class:`UnitError` for channels out of range of ``layer``; return its output shape."""
    shape = layer_output_shape(model, layer, input_shape, device)
    n = shape[0]
    bad = [c for c in channels if not 0 <= int(c) < n]
    if bad:
        raise UnitError(f"channels {bad} out of range for layer {layer!r}, which has {n} channels (0..{n - 1})")
    return shape


def receptive_field(model, layer, input_shape, device="cpu"):
    """Analytic receptive field of ``layer`` for chains of Conv/Pool and pointwise modules.

    Returns per-axis ``(size, stride, offset)`` such that output index ``p`` sees
    input indices ``[p * stride - offset, p * stride - offset + size)``, or ``None``
    when the path to ``layer`` contains a module whose footprint is unknown
    (then no cropping is done).
    """
    pointwise = (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.GELU,
                 nn.SiLU, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Dropout3d, nn.Identity)
    order = []
    handles = []
    for name, m in model.named_modules():
        if len(list(m.children())) == 0:
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, mod))))
    try:
        capture_activations(model, torch.zeros((1,) + tuple(input_shape), device=device), [layer])
    finally:
        for h in handles:
            h.remove()
    size, stride, offset = [1, 1, 1], [1, 1, 1], [0, 0, 0]
    for name, m in order:
        if isinstance(m, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            k = _triple(m.kernel_size)
            s = _triple(m.stride if m.stride is not None else m.kernel_size)
            p = _triple(m.padding)
            d = _triple(getattr(m, "dilation", 1))
            if isinstance(m, nn.Conv3d) and m.padding_mode != "zeros":
                return None
            for a in range(3):
                size[a] += (d[a] * (k[a] - 1)) * stride[a]
                offset[a] += p[a] * stride[a]
                stride[a] *= s[a]
        elif not isinstance(m, pointwise):
            return None
    return tuple(zip(size, stride, offset))


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
