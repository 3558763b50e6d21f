"""TorchScript models that forward hooks work on: the compiled graph tapped at its submodules' outputs.

Hooks cannot be registered on a ``torch.jit.ScriptModule``; :class:`TorchScriptModel` mirrors its submodules
and returns their outputs from a copy of the graph, so brainfv's unit addressing works on any TorchScript file.
"""
from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["TorchScriptModel", "hookable", "eval_mode", "first_line"]

_SCOPE = re.compile(r"([^.()]+)\(([^()]*)\)")
_FUNCTION_SCOPES = {"SELF", "UNKNOWN_INSTANCE"}  # a module's own methods, free functions
# uses that read a tensor's metadata, not its values (e.g. batch_norm's batch-size check): not consumers
_METADATA_OPS = {"aten::size", "aten::dim", "aten::len", "aten::numel", "prim::shape", "prim::device",
                 "prim::dtype", "prim::layout", "prim::requires_grad", "aten::is_floating_point",
                 "aten::__is__", "aten::__isnot__", "prim::is_cuda"}


class _Tap(nn.Module):
    """Stands for one submodule of a TorchScript model: its forward hooks see that submodule's output.

    ``original_name`` is the scripted class's name (``Conv3d``, ``DenseNet``...); for convolutions and
    pooling the footprint attributes (``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``padding_mode``) are copied, so receptive fields can be computed.
    """

    def __init__(self, script_module):
        super().__init__()
        self.original_name = getattr(script_module, "original_name", type(script_module).__name__)
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            try:
                v = getattr(script_module, attr)
            except (AttributeError, RuntimeError):
                continue
            if isinstance(v, (int, str, tuple, list)) or v is None:
                setattr(self, attr, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return self.original_name


class TorchScriptModel(nn.Module):
    """A TorchScript module that forward hooks (and so brainfv's unit addressing) work on.

    Hooks cannot be registered on a ``ScriptModule``. This wrapper mirrors the script module's
    submodules with stand-ins of the same names (``model.get_submodule("features.conv0")`` works);
    when hooks are registered on some of them, ``forward`` runs a copy of the compiled graph that also
    returns those submodules' outputs (cloned where they are produced, so later in-place operations
    do not alter them) and passes each output through its stand-in, in graph order, so the hooks fire
    as they would on an eager module. The graph is differentiated through, so activation maximization
    works; without hooks the script module runs unchanged.

    Limits: hooks only observe (a value a hook returns does not change the computation); a submodule
    whose output is not a tensor, is unused, or computes nothing (``Identity`` in a traced module) does
    not fire; module attributes other than ``training`` are read once, when a probe is built (branches
    on them are folded); a traced module keeps no kernel sizes, so receptive fields are unknown there.
    ``parameters()``, ``to()``, ``train()``/``eval()`` and ``state_dict()`` act on the script module,
    which is ``model.script``.
    """

    def __init__(self, script):
        super().__init__()
        if not isinstance(script, torch.jit.ScriptModule):
            raise TypeError(f"expected a torch.jit.ScriptModule, got {type(script).__name__}")
        object.__setattr__(self, "script", script)  # not a registered child: names stay the script's own
        object.__setattr__(self, "_probes", {})
        self.original_name = getattr(script, "original_name", type(script).__name__)
        taps = {"": self}
        for name, sub in script.named_modules():
            if not name:
                continue
            parent, _, leaf = name.rpartition(".")
            tap = _Tap(sub)
            if leaf in taps[parent].__dict__ or hasattr(type(taps[parent]), leaf):
                raise ValueError(f"TorchScript submodule name {name!r} clashes with an attribute of the wrapper")
            taps[parent].add_module(leaf, tap)
            taps[name] = tap
        self.events, self.tap_error = [], None
        try:
            self.events = self._find_outputs()
        except Exception as e:  # noqa: BLE001 - forward still works; only layer outputs are unavailable
            self.tap_error = f"{type(e).__name__}: {first_line(e)}"
            warnings.warn(f"TorchScript model {self.original_name}: cannot read its graph, so its intermediate "
                          f"layers cannot be observed ({self.tap_error})")
        self.train(script.training)

    # -- graph analysis ---------------------------------------------------------------------------------
    def _find_outputs(self):
        """``[(node index, output index, [module names])]``: values that leave a submodule, in graph order.

        A value is a submodule's output when it is produced inside that submodule's scope (per the
        inlined graph's module hierarchy) and used outside it, or returned by the graph.
        """
        graph = self._base_graph()
        names = {n for n, _ in self.script.named_modules()}
        returned = {v.unique() for v in graph.return_node().inputs()}
        events = []
        for i, node in enumerate(graph.nodes()):
            if node.kind() in ("prim::GetAttr", "prim::Constant"):
                continue
            path = _scope_path(node)
            if not path:
                continue
            for j, v in enumerate(node.outputs()):
                if not v.type().isSubtypeOf(torch._C.TensorType.get()):
                    continue
                users = [_user_scope(u.user) for u in v.uses()
                         if u.user.kind() != "prim::Return" and u.user.kind() not in _METADATA_OPS]
                leaves = []
                for k in range(len(path), 0, -1):
                    scope = path[:k]
                    if v.unique() in returned or any(u[:k] != scope for u in users):
                        name = ".".join(scope)
                        if name in names:
                            leaves.append(name)
                if leaves:
                    events.append((i, j, leaves))
        return events

    def _base_graph(self):
        """The inlined forward graph with module attributes (other than ``training``) made constants.

        Branches on configuration attributes (MONAI ResNet's ``if not self.no_max_pool``) are folded
        away, so submodules called inside them are top-level nodes whose outputs can be returned.
        """
        graph = self.script.inlined_graph.copy()
        self_value = next(iter(graph.inputs()))
        owners = {self_value.unique(): self.script}
        for node in _all_nodes(graph.block()):
            if node.kind() != "prim::GetAttr":
                continue
            owner = owners.get(node.input().unique())
            if owner is None:
                continue
            name = node.s("name")
            try:
                value = getattr(owner, name)
            except (AttributeError, RuntimeError):
                continue
            if isinstance(value, torch.jit.ScriptModule):
                owners[node.output().unique()] = value
            elif name != "training" and (value is None or isinstance(value, (bool, int, float, str))):
                with graph.insert_point_guard(node):
                    const = graph.insertConstant(value)
                node.output().replaceAllUsesWith(const)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_dce(graph)
        return graph

    def _probe(self, which):
        """A function of ``(script._c, *inputs)`` returning ``(output, *values of events[which])``."""
        fn = self._probes.get(which)
        if fn is None:
            graph = self._base_graph()
            nodes = list(graph.nodes())
            values = []
            for e in which:
                i, j, _ = self.events[e]
                v = nodes[i].outputsAt(j)
                none = graph.create("prim::Constant")
                none.output().setType(torch._C.NoneType.get())
                none.insertAfter(nodes[i])
                clone = graph.create("aten::clone", [v, none.output()], 1)
                clone.insertAfter(none)
                clone.output().setType(v.type())
                values.append(clone.output())
            for v in values:
                graph.registerOutput(v)
            graph.makeMultiOutputIntoTuple()
            fn = torch._C._create_function_from_graph(f"brainfv_taps_{len(self._probes)}", graph)
            self._probes[which] = fn
        return fn

    # -- nn.Module behaviour ----------------------------------------------------------------------------
    def forward(self, *args: torch.Tensor) -> object:
        taps = dict(self.named_modules())
        hooked = tuple(e for e, (_, _, leaves) in enumerate(self.events)
                       if any(taps[n]._forward_hooks or taps[n]._forward_pre_hooks for n in leaves))
        if not hooked:
            return self.script(*args)
        out = self._probe(hooked)(self.script._c, *args)
        for e, value in zip(hooked, out[1:]):
            for name in self.events[e][2]:
                taps[name](value)
        return out[0]

    def _apply(self, fn, *args, **kwargs):
        self.script._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> TorchScriptModel:
        self.script.train(mode)
        return super().train(mode)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        return self.script.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator:
        return self.script.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args: object, **kwargs: object) -> dict:
        return self.script.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> object:
        return self.script.load_state_dict(state_dict, strict=strict)

    def __getstate__(self):  # copies rebuild the probe functions lazily
        state = self.__dict__.copy()
        state["_probes"] = {}
        return state

    def __deepcopy__(self, memo):
        # copy.deepcopy of a ScriptModule records the parameter clones in autograd (non-leaf parameters,
        # which requires_grad_(False) then refuses): copy without grad, then restore the flags
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with torch.no_grad():
            state = copy.deepcopy(self.__getstate__(), memo)
        new.__setstate__(state)
        for p_new, p_old in zip(new.script.parameters(), self.script.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new

    def extra_repr(self) -> str:
        return f"TorchScript {self.original_name}"


def _scope_path(node):
    """Module names of the scope a graph node was inlined from, e.g. ``["features", "conv0"]``."""
    hier = node.getModuleHierarchy()
    return [inst for inst, _ in _SCOPE.findall(hier) if inst not in _FUNCTION_SCOPES] if hier else []


def _all_nodes(block):
    """Every node of a graph block, nested blocks included, in order."""
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _all_nodes(sub)


def _user_scope(node):
    """Scope of a node that uses a value: its own, else (nested in If/Loop blocks) its enclosing node's."""
    path = _scope_path(node)
    while not path:
        owner = node.owningBlock().owningNode()
        if owner is None:
            return path
        node = owner
        path = _scope_path(node)
    return path


def hookable(model: nn.Module) -> nn.Module:
    """``model`` itself, or a :class:`TorchScriptModel` around it if it is a TorchScript module."""
    if isinstance(model, TorchScriptModel) or not isinstance(model, torch.jit.ScriptModule):
        return model
    return TorchScriptModel(model)


class eval_mode:
    """Put a module (every submodule) in eval mode and restore each one's flag afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        mods = list(self.model.modules())
        if isinstance(self.model, TorchScriptModel):
            mods += list(self.model.script.modules())
        self.flags = [(m, m.training) for m in mods]
        self.model.eval()

    def __exit__(self, *exc):
        for m, t in self.flags:
            m.training = t
        return False


def first_line(e: BaseException) -> str:
    """The informative line of an exception message (TorchScript puts it last, after a traceback)."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if not s:
        return type(e).__name__
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    if "TorchScript interpreter" in lines[0] and len(lines) > 1:
        last = lines[-1]
        return re.sub(r"^\w+(Error|Exception): ", "", last)
    return lines[0]
