"""Units addressed by module name and channel; capturing activations with early stop."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import UnitError
from ..models.torchscript import TorchScriptModel, eval_mode, hookable

__all__ = ["parse_unit", "get_module", "capture_activations", "layer_output_shape", "check_channels",
           "receptive_field", "describe_units", "resolve_units"]


def parse_unit(address: str) -> tuple[str, int]:
    """``"block3.conv:12"`` → ``("block3.conv", 12)``."""
    layer, sep, ch = str(address).rpartition(":")
    if not sep or not layer or not ch.lstrip("-").isdigit():
        raise UnitError(f"unit address {address!r} must look like 'layer:channel', e.g. 'block3.conv:12'")
    return layer, int(ch)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; the error lists the model's module names."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise UnitError(f"layer {name!r} is not in the model ({type(model).__name__}); its layers are: "
                        f"{', '.join(names)}")
    return modules[name]


class _Stop(Exception):
    pass


def capture_activations(model: nn.Module, x: torch.Tensor | None, layers: Sequence[str],
                        truncate: bool = True) -> dict | Callable:
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
def layer_output_shape(model: nn.Module, layer: str, input_shape: Sequence[int],
                       device: str | torch.device = "cpu") -> tuple:
    """Shape (without batch) of ``layer``'s output for one input of ``input_shape`` (C, X, Y, Z)."""
    x = torch.zeros((1,) + tuple(input_shape), device=device)
    return tuple(capture_activations(model, x, [layer])[layer].shape[1:])


def check_channels(model: nn.Module, layer: str, channels: Sequence[int], input_shape: Sequence[int],
                   device: str | torch.device = "cpu") -> tuple:
    """Raise :class:`UnitError` for channels out of range of ``layer``; return its output shape."""
    shape = layer_output_shape(model, layer, input_shape, device)
    n = shape[0]
    bad = [c for c in channels if not 0 <= int(c) < n]
    if bad:
        raise UnitError(f"channels {bad} out of range for layer {layer!r}, which has {n} channels (0..{n - 1})")
    return shape


def receptive_field(model: nn.Module, layer: str, input_shape: Sequence[int],
                    device: str | torch.device = "cpu") -> list | None:
    """Analytic receptive field of ``layer`` for chains of Conv/Pool and pointwise modules.

    Returns per-axis ``(size, stride, offset)`` such that output index ``p`` sees
    input indices ``[p * stride - offset, p * stride - offset + size)``, or ``None``
    when the path to ``layer`` contains a module whose footprint is unknown, or is not a chain: a
    module that does not take the previous module's output (a skip connection, a concatenation, a
    functional op in between); then no cropping is done.
    """
    x = torch.zeros((1,) + tuple(input_shape), device=device)
    chain = _Chain(x)
    handles = [h for _, m in model.named_modules() if len(list(m.children())) == 0 for h in chain.register(m)]
    try:
        capture_activations(model, x, [layer])
    finally:
        for h in handles:
            h.remove()
    return chain.field()


class _Chain:
    """The receptive field of a chain of leaf modules, composed as they run (forward hook ``hook``): broken
    (None) when a module is not windowed or pointwise, or when its input is not the previous module's output."""

    def __init__(self, x):
        self.current, self.ok = (x, _version(x)), True
        self.size, self.stride, self.offset = [1, 1, 1], [1, 1, 1], [0, 0, 0]

    def pre_hook(self, module, inputs):
        """Before a leaf runs: its input must be the previous leaf's output, unchanged since (an in-place
        residual add bumps the tensor's version; the module's own in-place work comes after this check)."""
        if self.ok and not (inputs and inputs[0] is self.current[0]
                                           and _version(inputs[0]) == self.current[1]):
            self.ok = False

    def hook(self, module, inputs, output):
        self.step(module, inputs, output)

    def step(self, module, inputs, output):
        if self.ok:
            self.ok = _rf_step(module, self.size, self.stride, self.offset)
        self.current = (output, _version(output) if torch.is_tensor(output) else None)
        return self.ok

    def register(self, module):
        """Hooks on ``module`` (a leaf): the chain check before it runs, the field after."""
        return [module.register_forward_pre_hook(self.pre_hook), module.register_forward_hook(self.hook)]

    def field(self):
        return tuple(zip(self.size, self.stride, self.offset)) if self.ok else None


_POINTWISE = (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.GELU,
              nn.SiLU, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Dropout3d, nn.Identity)
_WINDOWED = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)


def _rf_kind(m):
    """``"window"`` (Conv3d / MaxPool3d / AvgPool3d), ``"pointwise"`` or None (footprint unknown).

    Stand-ins for TorchScript submodules (``models.torchscript.TorchScriptModel``) are judged by the scripted
    class's ``original_name`` and the footprint attributes copied from it.
    """
    if isinstance(m, _WINDOWED):
        return "window"
    if isinstance(m, _POINTWISE):
        return "pointwise"
    original = getattr(m, "original_name", None)
    if isinstance(original, str) and not isinstance(m, torch.jit.ScriptModule) and len(list(m.children())) == 0:
        if original in {c.__name__ for c in _WINDOWED} and hasattr(m, "kernel_size"):
            return "window"
        if original in {c.__name__ for c in _POINTWISE}:
            return "pointwise"
    return None


def _rf_step(m, size, stride, offset):
    """Compose the running receptive field (lists, updated in place) with module ``m``; False if unknown."""
    kind = _rf_kind(m)
    if kind == "pointwise":
        return True
    if kind != "window":
        return False
    if isinstance(getattr(m, "padding", 0), str):  # "same"/"valid": not a fixed offset here
        return False
    if getattr(m, "padding_mode", "zeros") != "zeros" and (isinstance(m, nn.Conv3d)
                                                           or getattr(m, "original_name", "") == "Conv3d"):
        return False
    k = _triple(m.kernel_size)
    s = _triple(m.stride if m.stride is not None else m.kernel_size)
    p = _triple(m.padding)
    d = _triple(getattr(m, "dilation", 1))
    for a in range(3):
        size[a] += (d[a] * (k[a] - 1)) * stride[a]
        offset[a] += p[a] * stride[a]
        stride[a] *= s[a]
    return True


@torch.no_grad()
def describe_units(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu") -> list[dict]:
    """Every layer of ``model`` that can be addressed as ``layer:channel``, in forward order.

    One forward pass of a zero input ``(1, *input_shape)`` in eval mode, with forward hooks on every
    named module; each module's training flag is restored afterwards.

    Parameters
    ----------
    model : nn.Module or torch.jit.ScriptModule
        A TorchScript module is wrapped in :class:`brainfv.models.torchscript.TorchScriptModel`, whose stand-in
        submodules see the compiled graph's values (if its graph cannot be read, the modules are listed
        by name and type only, with no shapes).
    input_shape : sequence of int
        ``(channels, X, Y, Z)`` of one input.

    Returns
    -------
    list of dict
        One per module, in the order their outputs were produced, with keys ``layer`` (the name for
        ``layer:channel``), ``type`` (class name), ``output_shape`` (tuple without batch; None if the
        output is not a tensor), ``channels`` (dim 1 of the output; None if it has none), ``spatial``
        (the output is ``(B, C, X, Y, Z)``), ``rf_size`` and ``rf_stride`` (receptive field in input
        voxels per axis, as :func:`receptive_field` computes it; None when the path holds a module whose
        footprint is unknown) and ``calls`` (how often the module ran; the shape is the first call's).
        Left out: the root, modules that did not run, and containers whose output is the very tensor
        one of their submodules produced on its first call, unchanged since (e.g. a ``Sequential``). A
        container that computes a tensor of its own (a dense layer's concatenation, a residual block
        whose shared activation module runs twice) is listed.
    """
    model = hookable(model)
    if isinstance(model, TorchScriptModel) and model.tap_error:
        return [{"layer": n, "type": _type_name(m), "output_shape": None, "channels": None, "spatial": False,
                 "rf_size": None, "rf_stride": None, "calls": None} for n, m in model.named_modules() if n]
    names = {m: n for n, m in reversed(list(model.named_modules())) if n}  # first name of shared modules
    rows, keep = {}, []
    produced = {}  # (id, version) of first-call outputs -> module name: the "same tensor" test
    x = torch.zeros((1,) + tuple(int(s) for s in input_shape), device=device)
    chain = _Chain(x)

    def hook(module, inputs, output):
        name = names[module]
        leaf = len(list(module.children())) == 0
        if leaf:  # every call counts, as in receptive_field
            chain.step(module, inputs, output)
        if name in rows:
            rows[name]["calls"] += 1
            return
        tensor = output if torch.is_tensor(output) else None
        key = (id(tensor), _version(tensor))  # the version tells apart a tensor changed in place since
        same = tensor is not None and not leaf and produced.get(key, "").startswith(name + ".")
        if tensor is not None:
            keep.append(tensor)  # keeps ids unique while the pass runs
            produced.setdefault(key, name)
        rows[name] = {**_unit_row(name, module, tensor, chain), "_skip": same}

    _forward_with_hooks(model, names, chain, hook, x)
    return [{k: v for k, v in r.items() if k != "_skip"} for r in rows.values() if not r["_skip"]]


def _unit_row(name: str, module: nn.Module, tensor: torch.Tensor | None, chain: _Chain) -> dict:
    """One row of :func:`describe_units` for a module's first output (``tensor``; None if not a tensor)."""
    shape = tuple(tensor.shape[1:]) if tensor is not None else None
    spatial = shape is not None and len(shape) == 4
    return {"layer": name, "type": _type_name(module), "output_shape": shape,
            "channels": int(shape[0]) if shape else None, "spatial": spatial,
            "rf_size": tuple(chain.size) if chain.ok and spatial else None,
            "rf_stride": tuple(chain.stride) if chain.ok and spatial else None, "calls": 1}


def _forward_with_hooks(model: nn.Module, names: dict, chain: _Chain, hook: Callable, x: torch.Tensor) -> None:
    """One eval-mode forward of ``x`` with ``hook`` (and the receptive-field chain's pre-hook on leaves) on every
    named module that takes hooks; the hooks are removed afterwards."""
    handles = []
    try:
        for module in names:
            if not isinstance(module, torch.jit.ScriptModule):
                if len(list(module.children())) == 0:
                    handles.append(module.register_forward_pre_hook(chain.pre_hook))
                handles.append(module.register_forward_hook(hook))
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()


def _version(tensor):
    try:
        return tensor._version if tensor is not None else None
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def _type_name(module):
    return getattr(module, "original_name", None) or type(module).__name__


def resolve_units(model: nn.Module, layer: str, spec: str | int | list[int], input_shape: Sequence[int],
                  device: str | torch.device = "cpu") -> list[int]:
    """Channel indices of ``layer`` that a config spec asks for, checked against the layer's real size.

    ``spec`` is ``"all"``, a count N (the first N channels; fewer if the layer has fewer, as in
    :func:`brainfv.models.arch.resolve_units`) or a list of channel indices (returned sorted, without repeats).
    ``input_shape`` is (C, X, Y, Z).
    Raises :class:`UnitError` naming the layer and its channel count.
    """
    shape = layer_output_shape(hookable(model), layer, input_shape, device)
    if len(shape) == 0:
        raise UnitError(f"layer {layer!r} outputs a scalar per input; it has no channels to visualise")
    n = int(shape[0])
    if spec == "all":
        return list(range(n))
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise UnitError(f"layer {layer!r}: unit count must be >= 1, got {spec} (the layer has {n} channels)")
        return list(range(min(spec, n)))
    if isinstance(spec, (list, tuple)) and spec:
        bad = [u for u in spec if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < n]
        if bad:
            raise UnitError(f"layer {layer!r} has {n} channels (0..{n - 1}); channels {bad} are out of range")
        return sorted({int(u) for u in spec})  # ascending, once each: volumes and tables follow this order
    raise UnitError(f"layer {layer!r}: units must be 'all', a count or a list of channels (the layer has {n}), "
                    f"got {spec!r}")


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
