"""Load a model the user already trained, from a plain config dict, and check it against the cohort grid.

A *model spec* is the dict that appears in config (all keys but ``checkpoint`` optional)::

    model:
      checkpoint: models/densenet.pt
      format: state_dict            # auto | torchscript | state_dict | full | brainfv
      architecture:                 # state_dict only: what to build before loading the weights
        name: "monai:DenseNet121"   # or "my_pkg.nets:MyNet" (any importable module:Class)
        kwargs: {spatial_dims: 3, in_channels: 1, out_channels: 2}
      state_dict_key: null          # where the weights sit in the file (default: found automatically)
      strip_prefix: null            # a key prefix to remove (default: "module." / "_orig_mod." automatically)
      allow_pickle: false           # needed for format: full (and for checkpoints holding Python objects)
      input: {shape: [182, 218, 182], voxel_size: 1.0, normalisation: zscore-brain, channels: 1}
      classes: [control, patient]

Formats
-------
``torchscript``
    A file written by ``torch.jit.save`` (of ``torch.jit.script`` or ``torch.jit.trace``). Loading runs
    no Python code from the file. TorchScript modules do not accept forward hooks, which brainfv uses to
    read a layer's activations, so the module is wrapped in :class:`TorchScriptModel`: an ``nn.Module``
    whose submodules carry the script module's names and whose forward returns the requested layers
    from the compiled graph itself.
``state_dict``
    Weights only (``torch.save(model.state_dict(), path)``, possibly inside a dict such as
    ``{"state_dict": ..., "epoch": ...}``); the network is built from ``architecture`` and the weights are
    read with ``torch.load(weights_only=True)``.
``full``
    A whole pickled module (``torch.save(model, path)``). Unpickling executes arbitrary code, so it is
    refused unless the spec says ``allow_pickle: true``.
``brainfv``
    A checkpoint written by the study (:func:`brainfv.models.save_checkpoint`).
``auto`` (default)
    Tells TorchScript archives, brainfv checkpoints and weights apart by their content.

Every error names the config key at fault (``where``, e.g. ``tasks.mymodel.model``) and the file.
"""
from __future__ import annotations

import collections
import copy
import importlib
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["FORMATS", "NORMALISATIONS", "load_model", "build_architecture", "extract_state_dict",
           "check_model_input", "check_model_dataset", "check_model_file", "TorchScriptModel", "hookable"]

FORMATS = ("auto", "torchscript", "state_dict", "full", "brainfv")

#: input normalisations a spec may name; the study's cohort provides ``zscore-brain``
NORMALISATIONS = {
    "zscore-brain": "z-score within the brain mask (what the brainfv cohort provides)",
    "zscore": "z-score over the whole volume",
    "minmax": "scaled to [0, 1]",
    "none": "raw scanner intensities",
}
_NORMALISATION_ALIASES = {"z-score within brain mask": "zscore-brain", "zscore_brain": "zscore-brain",
                          "raw": "none", None: None}

def _schema_keys(path):
    from .config import node

    return set(node(path)["properties"])


_SPEC_KEYS = _schema_keys("model_spec")  # one definition: the config schema's $defs.model_spec
_INPUT_KEYS = _schema_keys("model_spec.input")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights", "module")
_AUTO_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_PICKLE_ADVICE = ("Unpickling executes arbitrary code from the file. Prefer a TorchScript export "
                  "(torch.jit.save(torch.jit.script(model), path); format: torchscript) or the weights alone "
                  "(torch.save(model.state_dict(), path); format: state_dict with an architecture). "
                  "If you trust the file, set allow_pickle: true")


# ----------------------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------------------

def load_model(spec, device="cpu", where="model"):
    """Load the model a spec describes; returns ``(model in eval mode on device, info)``.

    Parameters
    ----------
    spec : dict or str
        The model spec (see the module docstring); a bare path means ``{"checkpoint": path}``.
    device : str or torch.device
    where : str
        Config key of the spec, used in error messages (e.g. ``"tasks.mymodel.model"``).

    Returns
    -------
    model : nn.Module
        In eval mode, parameters on ``device``. A TorchScript file comes back as a
        :class:`TorchScriptModel` (hooks work on it; the raw module is ``model.script``).
    info : dict
        ``format``, ``checkpoint``, ``architecture``, ``classes``, ``input`` (shape, voxel_size,
        normalisation, channels; None where unknown), ``n_parameters``, ``notes`` (what was done to the
        file, e.g. a stripped key prefix), and ``meta`` for brainfv checkpoints.
    """
    spec = _check_spec(spec, where)
    path = Path(spec["checkpoint"]).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "file not found"
        raise ConfigError(f"{where}.checkpoint: {what}: {path}")
    check_model_file(path, where)
    device = torch.device(device)
    fmt = spec.get("format") or "auto"
    notes = []
    if fmt == "auto":
        fmt = _detect_format(path, spec, where)
        notes.append(f"format detected as {fmt}")
        if spec.get("architecture") and fmt != "state_dict":  # never ignored in silence
            raise ConfigError(f"{where}.architecture: {path} is a {fmt} file, which brings its own network, so "
                              f"architecture {spec['architecture']['name']!r} would not be used; remove it (it is "
                              f"only for weights-only files, format: state_dict)")
    info = {"format": fmt, "checkpoint": str(path), "architecture": None, "classes": spec.get("classes"),
            "input": _input_info(spec.get("input"), where), "notes": notes}
    if fmt == "torchscript":
        model = _load_torchscript(path, device, where, notes)
        info["architecture"] = getattr(model.script, "original_name", type(model.script).__name__)
    elif fmt == "full":
        model = _load_full(path, spec, device, where)
        info["architecture"] = f"{type(model).__module__}:{type(model).__qualname__}"
    elif fmt == "brainfv":
        model = _load_brainfv(path, device, where, info)
        info["architecture"] = "brainfv:BrainCNN"
    else:  # state_dict
        if not spec.get("architecture"):
            raise ConfigError(f"{where}.architecture: {path} holds weights only (format: state_dict), so the "
                              f"network to put them in must be named, e.g. architecture: {{name: "
                              f"'monai:DenseNet121', kwargs: {{spatial_dims: 3, in_channels: 1, out_channels: 2}}}} "
                              f"or {{name: 'my_pkg.nets:MyNet', kwargs: {{...}}}}")
        model = build_architecture(spec["architecture"], where=f"{where}.architecture")
        ckpt = _torch_load(path, device, spec.get("allow_pickle", False), where)
        state = extract_state_dict(ckpt, spec.get("state_dict_key"), where=where, path=path, notes=notes)
        _load_weights(model, state, spec.get("strip_prefix"), where, path, notes)
        info["architecture"] = spec["architecture"]["name"]
    model = model.to(device).eval()
    info["n_parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, info


def _check_spec(spec, where):
    if isinstance(spec, (str, Path)):
        spec = {"checkpoint": str(spec)}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with at least 'checkpoint', got {type(spec).__name__}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
    if not spec.get("checkpoint"):
        raise ConfigError(f"{where}.checkpoint: missing; give the path of the model file")
    fmt = spec.get("format") or "auto"
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format: must be one of {list(FORMATS)}, got {fmt!r}")
    if not isinstance(spec.get("allow_pickle", False), bool):
        raise ConfigError(f"{where}.allow_pickle: must be true or false, got {spec['allow_pickle']!r}")
    arch = spec.get("architecture")
    if arch is not None:
        if isinstance(arch, str):
            spec = {**spec, "architecture": {"name": arch, "kwargs": {}}}
        elif not isinstance(arch, dict) or "name" not in arch:
            raise ConfigError(f"{where}.architecture: expected {{name: 'monai:Name' or 'module:Class', kwargs: "
                              f"{{...}}}}, got {arch!r}")
        elif set(arch) - {"name", "kwargs"}:
            raise ConfigError(f"{where}.architecture: unknown keys {sorted(set(arch) - {'name', 'kwargs'})}; "
                              f"known: ['kwargs', 'name']")
        if fmt not in ("auto", "state_dict"):
            raise ConfigError(f"{where}.architecture: only used with format: state_dict (the {fmt} file "
                              f"brings its own network); remove it or change format")
    classes = spec.get("classes")
    if classes is not None and (not isinstance(classes, (list, tuple)) or not classes):
        raise ConfigError(f"{where}.classes: expected a list of class names, got {classes!r}")
    return spec


def _input_info(inp, where):
    """The spec's ``input`` section, validated, with every key present (None where not stated)."""
    inp = dict(inp or {})
    unknown = set(inp) - _INPUT_KEYS
    if unknown:
        raise ConfigError(f"{where}.input: unknown keys {sorted(unknown)}; known: {sorted(_INPUT_KEYS)}")
    shape = inp.get("shape")
    if shape is not None:
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ConfigError(f"{where}.input.shape: expected three positive integers [X, Y, Z], got {shape!r}")
        shape = [int(s) for s in shape]
    vs = inp.get("voxel_size")
    if vs is not None:
        vals = vs if isinstance(vs, (list, tuple)) else [vs]
        if len(vals) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                              for v in vals):
            raise ConfigError(f"{where}.input.voxel_size: expected a positive number (mm) or three, got {vs!r}")
    norm = _normalisation_name(inp.get("normalisation"), f"{where}.input.normalisation")
    ch = inp.get("channels", 1)
    if not isinstance(ch, int) or isinstance(ch, bool) or ch < 1:
        raise ConfigError(f"{where}.input.channels: expected a positive integer, got {ch!r}")
    return {"shape": shape, "voxel_size": vs, "normalisation": norm, "channels": ch}


def _normalisation_name(name, where):
    name = _NORMALISATION_ALIASES.get(name, name)
    if name is not None and name not in NORMALISATIONS:
        raise ConfigError(f"{where}: unknown normalisation {name!r}; known: "
                          + "; ".join(f"{k} ({v})" for k, v in NORMALISATIONS.items()))
    return name


# ----------------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------------

def check_model_file(path, where="model"):
    """Raise :class:`ConfigError` if ``path`` cannot be a PyTorch model file (damaged, truncated, or another
    kind of file), before any loader sees it: such a file is named as damaged, never as a pickled model.

    A model file is either a zip archive (``torch.save`` since PyTorch 1.6, ``torch.jit.save``), whose
    members are checked against their CRCs, or a legacy pickle (``torch.save(...,
    _use_new_zipfile_serialization=False)``), which starts with a pickle protocol byte.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04" or zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ConfigError(_damaged(path, where, f"a zip archive that cannot be read ({e}): truncated or "
                                                    f"partly overwritten")) from None
        if bad is not None:
            raise ConfigError(_damaged(path, where, f"member {bad!r} of the zip archive fails its checksum"))
        return
    if not head:
        raise ConfigError(_damaged(path, where, "the file is empty"))
    if head[0] != 0x80:  # every pickle protocol >= 2 (what torch.save writes) starts with PROTO 0x80
        raise ConfigError(_damaged(path, where, f"neither a PyTorch zip archive nor a pickle (it starts with bytes "
                                                f"{head.hex(' ')})"))


def _damaged(path, where, detail):
    size = Path(path).stat().st_size
    return (f"{where}.checkpoint: {path} is damaged or not a model file: {detail}; {size:,} bytes. Copy it again "
            f"or export it again (torch.save / torch.jit.save)")


def _refused_object(e):
    """Whether a torch.load error is weights_only refusing a Python object (an intact pickle holding more than
    tensors), not broken data (random bytes give 'Unsupported operand', truncation an IndexError/EOFError)."""
    return isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e)


def _detect_format(path, spec, where):
    """``torchscript`` for a TorchScript archive, ``brainfv`` for a study checkpoint, else ``state_dict``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses Python objects; say what that means
        if not _refused_object(e):
            raise ConfigError(_damaged(path, where, f"its data does not unpickle ({_load_error(e)})")) from None
        if spec.get("allow_pickle"):
            ck = _torch_load(path, "cpu", True, where)
            return "full" if isinstance(ck, nn.Module) else "state_dict"
        raise ConfigError(f"{where}.checkpoint: {path} is not a TorchScript archive and holds Python objects "
                          f"besides tensors (torch.load(weights_only=True) says: {_unpickling_reason(e)}). It is probably "
                          f"a whole pickled model (format: full) or a training checkpoint with extra objects. "
                          f"{_PICKLE_ADVICE}.") from None
    if isinstance(ck, dict) and {"state_dict", "arch", "meta"} <= set(ck):
        return "brainfv"
    return "state_dict"


def _torch_load(path, device, allow_pickle, where):
    try:
        return torch.load(path, map_location=device, weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001
        if not _refused_object(e):  # not a refusal of Python objects: the data itself is broken
            raise ConfigError(_damaged(path, where, f"its data does not unpickle ({_load_error(e)})")) from None
        if not allow_pickle and isinstance(e, pickle.UnpicklingError):
            raise ConfigError(f"{where}.checkpoint: {path} holds Python objects besides tensors, which "
                              f"torch.load(weights_only=True) refuses ({_unpickling_reason(e)}). {_PICKLE_ADVICE} "
                              f"(at {where}.allow_pickle).") from None
        raise ConfigError(f"{where}.checkpoint: cannot read {path}: {_first_line(e)}") from e


def _load_torchscript(path, device, where, notes):
    if not zipfile.is_zipfile(path):  # check_model_file let it through as a pickle: an intact one?
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            if not _refused_object(e):
                raise ConfigError(_damaged(path, where, f"its data does not unpickle ({_load_error(e)})")) from None
        raise ConfigError(f"{where}.format: {path} is not a TorchScript file (torch.jit.save writes a zip archive; "
                          f"this is a pickle): weights (format: state_dict) or a pickled model (format: full)?")
    try:
        script = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}.checkpoint: {path} is not a loadable TorchScript file ({_first_line(e)}); "
                          f"write one with torch.jit.save(torch.jit.script(model), path)") from e
    model = TorchScriptModel(script)
    if model.tap_error:
        notes.append(f"intermediate layers unavailable: {model.tap_error}")
    return model


def _load_full(path, spec, device, where):
    if not spec.get("allow_pickle"):
        raise ConfigError(f"{where}.allow_pickle: {path} is a whole pickled model (format: full). "
                          f"{_PICKLE_ADVICE} (at {where}.allow_pickle).")
    obj = _torch_load(path, device, True, where)
    if not isinstance(obj, nn.Module):
        kind = "a dict (weights? use format: state_dict)" if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{where}.format: {path} holds {kind}, not a pickled nn.Module")
    return obj


def _load_brainfv(path, device, where, info):
    from .models import load_checkpoint

    ck = _torch_load(path, "cpu", False, where)  # peek safely before the full load
    if not (isinstance(ck, dict) and {"state_dict", "arch", "meta"} <= set(ck)):
        raise ConfigError(f"{where}.format: {path} is not a brainfv checkpoint (no state_dict/arch/meta keys)")
    model, meta = load_checkpoint(path, map_location=device)
    info["meta"] = meta
    grid = meta.get("grid") or {}
    given = {k: v for k, v in info["input"].items() if v is not None and k != "channels"}
    info["input"] = {"shape": grid.get("shape"), "voxel_size": grid.get("voxel_size"),
                     "normalisation": _NORMALISATION_ALIASES.get(meta.get("normalisation"), meta.get("normalisation")),
                     "channels": ck["arch"].get("in_channels", 1), **given}
    info["classes"] = info["classes"] or meta.get("classes")
    return model


# ----------------------------------------------------------------------------------------------------------
# architectures and weights
# ----------------------------------------------------------------------------------------------------------

def build_architecture(arch, where="model.architecture"):
    """Instantiate ``arch["name"](**arch["kwargs"])``.

    ``name`` is ``"monai:<Name>"`` (a class of :mod:`monai.networks.nets`, MONAI being an optional
    dependency) or ``"module.path:ClassName"`` for any importable class.
    """
    if isinstance(arch, str):
        arch = {"name": arch}
    name, kwargs = arch.get("name"), arch.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.kwargs: expected a mapping of keyword arguments, got {kwargs!r}")
    if not isinstance(name, str) or ":" not in name:
        raise ConfigError(f"{where}.name: expected 'monai:<Name>' (e.g. monai:DenseNet121) or "
                          f"'module.path:ClassName' (e.g. my_pkg.nets:MyNet), got {name!r}")
    mod_name, _, cls_name = name.partition(":")
    if mod_name == "monai":
        try:
            module = importlib.import_module("monai.networks.nets")
        except ImportError as e:
            raise ConfigError(f"{where}.name: {name} needs MONAI, which is not installed ({e}). Install it "
                              f"next to the torch you have, without letting pip replace torch: "
                              f"`pip install monai --no-deps` (or `pip install 'brainfv[monai]' torch==<your "
                              f"torch version>`)") from None
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ConfigError(f"{where}.name: cannot import module {mod_name!r} ({e}); install the package "
                              f"that defines {cls_name} or put its folder on PYTHONPATH") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        import difflib

        candidates = sorted(n for n in dir(module) if isinstance(getattr(module, n), type)
                            and issubclass(getattr(module, n), nn.Module))
        close = difflib.get_close_matches(cls_name, candidates, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if mod_name == "monai" and not close:
            hint = f"; its networks include {', '.join(candidates[:30])}, ..."
        raise ConfigError(f"{where}.name: {module.__name__} has no {cls_name!r}{hint}")
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}.kwargs: {name}({_fmt_kwargs(kwargs)}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}.name: {name} built a {type(model).__name__}, not a torch nn.Module")
    return model


def extract_state_dict(ckpt, key=None, where="model", path=None, notes=None):
    """The ``{name: tensor}`` mapping inside a loaded checkpoint.

    With ``key`` (``state_dict_key`` in the spec; ``"a.b"`` for nested dicts) that entry is used; else the
    checkpoint itself if all its values are tensors, else the first of ``state_dict``, ``model_state_dict``,
    ``model``, ``net``, ``network``, ``weights``, ``module`` that holds tensors.
    """
    src = f" in {path}" if path else ""
    if key:
        obj = ckpt
        for part in str(key).split("."):
            if not isinstance(obj, dict) or part not in obj:
                keys = sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__
                raise ConfigError(f"{where}.state_dict_key: no entry {key!r}{src}; its keys are: {keys}")
            obj = obj[part]
        if not _is_state_dict(obj):
            raise ConfigError(f"{where}.state_dict_key: entry {key!r}{src} is a {type(obj).__name__}, "
                              f"not a mapping of names to tensors")
        return obj
    if isinstance(ckpt, nn.Module):
        raise ConfigError(f"{where}.format: the file{src} holds a whole model, not weights; use format: full "
                          f"(with allow_pickle: true)")
    if _is_state_dict(ckpt):
        return ckpt
    if isinstance(ckpt, dict):
        for k in _WRAPPER_KEYS:
            if k in ckpt and _is_state_dict(ckpt[k]):
                if notes is not None:
                    notes.append(f"weights read from the checkpoint's {k!r} entry")
                return ckpt[k]
        raise ConfigError(f"{where}.state_dict_key: cannot tell where the weights are{src}; its top-level "
                          f"keys are {sorted(map(str, ckpt))[:20]}: set state_dict_key to the one holding them")
    raise ConfigError(f"{where}.checkpoint: the file{src} holds a {type(ckpt).__name__}, not weights")


def _is_state_dict(obj):
    return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(torch.is_tensor(v) for v in obj.values()))


def _load_weights(model, state, strip_prefix, where, path, notes):
    """Load ``state`` strictly, removing known key prefixes; errors list a few missing/unexpected keys."""
    expected = model.state_dict()
    prefixes = [strip_prefix] if strip_prefix else list(_AUTO_PREFIXES)
    for p in prefixes:
        if state and all(k.startswith(p) for k in state):
            state = _strip(state, p)
            notes.append(f"key prefix {p!r} removed")
    if strip_prefix and not any(n.startswith(f"key prefix {strip_prefix!r}") for n in notes):
        raise ConfigError(f"{where}.strip_prefix: not every key in {path} starts with {strip_prefix!r} "
                          f"(first keys: {list(state)[:3]})")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing and unexpected and not strip_prefix:  # e.g. Lightning's "model." on every key
        first = {k.split(".", 1)[0] for k in state}
        if len(first) == 1:
            p = first.pop() + "."
            stripped = _strip(state, p) if all(k.startswith(p) for k in state) else None
            if stripped is not None and set(stripped) == set(expected):
                state, missing, unexpected = stripped, [], []
                notes.append(f"key prefix {p!r} removed")
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    if counters:  # older checkpoints lack BatchNorm's step counter; eval-mode outputs do not use it
        meta = getattr(state, "_metadata", None)
        state = collections.OrderedDict({**state, **{k: expected[k] for k in counters}})
        if meta is not None:
            state._metadata = meta
        missing = [k for k in missing if k not in counters]
        notes.append(f"{len(counters)} BatchNorm num_batches_tracked counters missing from the file (set to 0)")
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        arch = type(model).__name__
        parts = [f"{where}: the weights in {path} do not fit the {arch} built from {where}.architecture"]
        if missing:
            parts.append(f"{len(missing)} missing keys (in the network, not in the file), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (in the file, not in the network), e.g. "
                         f"{unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape (name, file, network), e.g. {shapes[:3]}")
        parts.append("check architecture.kwargs (channels, classes, spatial_dims), state_dict_key and "
                     "strip_prefix")
        raise ConfigError("; ".join(parts))
    model.load_state_dict(state, strict=True)


def _strip(state, prefix):
    out = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    meta = getattr(state, "_metadata", None)
    if meta is not None:  # versioned loaders (e.g. BatchNorm's num_batches_tracked) read it
        out = collections.OrderedDict(out)
        out._metadata = collections.OrderedDict(
            (k[len(prefix):] if k.startswith(prefix) else ("" if k + "." == prefix else k), v)
            for k, v in meta.items())
    return out


# ----------------------------------------------------------------------------------------------------------
# checking against the cohort
# ----------------------------------------------------------------------------------------------------------

def check_model_input(info, grid_shape, voxel_size, model=None, *, normalisation="zscore-brain", where="model",
                      device=None, rtol=1e-3, grid_label="the cohort grid"):
    """Check that the cohort's grid is what the model was trained on; optionally probe the model with it.

    Parameters
    ----------
    info : dict
        ``info`` from :func:`load_model`, or the spec itself (its ``input`` and ``classes`` are read).
    grid_shape : sequence of 3 int
        The cohort grid (e.g. ``Grid.shape``).
    voxel_size : float or sequence of 3 float or None
        The cohort's voxel size in mm (None: not checked).
    model : nn.Module, optional
        If given, one forward pass with a zero tensor ``(1, channels, *grid_shape)`` (no gradients)
        confirms the model accepts the grid, and its output is compared with ``classes``.
    normalisation : str
        The cohort's intensity normalisation (brainfv cohorts: ``zscore-brain``).
    where : str
        Config key of the spec, for messages.
    grid_label : str
        How messages call the grid (e.g. ``"the --shape grid"`` on the command line).

    Returns
    -------
    tuple or None
        The output shape (without batch) of the probe forward, or None without ``model``.

    Raises
    ------
    ConfigError
        Naming what the model expects and what the cohort provides.
    """
    if not isinstance(info, dict):
        raise ConfigError(f"{where}: expected the info dict of load_model or the model spec, got {info!r}")
    inp = _input_info(info.get("input"), where)  # validates a raw spec; idempotent on load_model's info
    grid_shape = tuple(int(s) for s in grid_shape)
    cohort = f"{grid_label} is {_fmt_shape(grid_shape)} voxels" + (
        f" of {_fmt_vs(voxel_size)} mm" if voxel_size is not None else "")
    expects = []
    if inp.get("shape") is not None and tuple(inp["shape"]) != grid_shape:
        expects.append(f"input {_fmt_shape(inp['shape'])} ({where}.input.shape)")
    if inp.get("voxel_size") is not None and voxel_size is not None and not _same_vs(inp["voxel_size"], voxel_size,
                                                                                      rtol):
        expects.append(f"{_fmt_vs(inp['voxel_size'])} mm voxels ({where}.input.voxel_size)")
    problems = [f"the model expects {' and '.join(expects)} but {cohort}"] if expects else []
    want = _normalisation_name(inp.get("normalisation"), f"{where}.input.normalisation")
    have = _normalisation_name(normalisation, "cohort normalisation")
    if want is not None and have is not None and want != have:
        problems.append(f"the model expects intensities {want} ({NORMALISATIONS[want]}; "
                        f"{where}.input.normalisation) but the cohort provides {have} ({NORMALISATIONS[have]})")
    if problems:
        raise ConfigError(f"{where}: the model does not match {_dataset_name(grid_label)}: " + "; ".join(problems)
                          + ". Use data on the model's training grid (in the workflow: set grid.voxel_size and "
                            "grid.bbox_mm), or correct the model's input section if it is wrong")
    if model is None:
        return None
    channels = int(inp.get("channels") or 1)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else "cpu"
    x = torch.zeros((1, channels) + grid_shape, device=device)
    with _eval_mode(model), torch.no_grad():
        try:
            out = model(x)
        except Exception as e:  # noqa: BLE001 - explain shape errors in terms of the cohort
            raise ConfigError(f"{where}: the model fails on an input of {grid_label} (tensor "
                              f"{_fmt_shape(tuple(x.shape))}: batch, channels, X, Y, Z; {cohort}): "
                              f"{type(e).__name__}: {_first_line(e)}. Was it trained on another grid, or with "
                              f"other than {channels} input channel{'s' if channels > 1 else ''} "
                              f"({where}.input.channels)?") from e
    if not torch.is_tensor(out):
        return None
    classes = info.get("classes") if isinstance(info, dict) else None
    if classes and (out.ndim != 2 or out.shape[1] != len(classes)):
        raise ConfigError(f"{where}.classes: {len(classes)} classes {list(classes)} but the model's output "
                          f"on the cohort grid has shape {tuple(out.shape[1:])} (without batch)")
    return tuple(out.shape[1:])


def check_model_dataset(model, info, grid, *, where="model", dataset="the cohort", log=None, probe=True):
    """The one check of a model against the dataset it is about to be run on, shared by the workflow
    (``describe_model``, every ``visualize`` job) and ``brainfv visualize``.

    The grid the model states (a brainfv checkpoint's training grid, or a spec's ``input.shape`` /
    ``input.voxel_size`` / ``input.normalisation``) must be the dataset's, and (``probe``) one forward pass on
    the dataset's grid must work. A model that states no grid cannot be checked: ``log`` gets a warning
    saying so (a network with adaptive pooling accepts any grid, so nothing else would notice).

    Parameters
    ----------
    model : nn.Module
    info : dict
        ``info`` of :func:`load_model`.
    grid : brainfv.data.grid.Grid
        The dataset's grid (``Dataset.grid``).
    where : str
        Config key (or command-line name) of the model, for messages.
    dataset : str
        How messages name the dataset, e.g. ``"the dataset results/data/cohort"``.

    Returns
    -------
    tuple or None
        As :func:`check_model_input`: the output shape of the probe forward.
    """
    stated = info.get("input") or {}
    if stated.get("shape") is None and stated.get("voxel_size") is None and log is not None:
        log(f"WARNING: {where} does not state the grid it was trained on (input.shape, input.voxel_size), so it "
            f"cannot be checked against {dataset} ({_fmt_shape(grid.shape)} voxels of {_fmt_vs(grid.voxel_size)} mm); "
            f"state it in the model's input section")
    return check_model_input(info, grid.shape, grid.voxel_size, model if probe else None, where=where,
                             grid_label=f"{dataset}'s grid")


def _dataset_name(grid_label):
    return grid_label.removesuffix("'s grid").removesuffix(" grid")


class _eval_mode:
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


def _same_vs(a, b, rtol):
    a = [float(v) for v in (a if isinstance(a, (list, tuple)) else [a] * 3)]
    b = [float(v) for v in (b if isinstance(b, (list, tuple)) else [b] * 3)]
    a, b = (a * 3 if len(a) == 1 else a), (b * 3 if len(b) == 1 else b)
    return all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


def _fmt_shape(shape):
    return "x".join(str(int(s)) for s in shape)


def _fmt_vs(vs):
    vals = vs if isinstance(vs, (list, tuple)) else [vs]
    return "x".join(f"{float(v):g}" for v in vals)


def _fmt_kwargs(kwargs):
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _first_line(e):
    """The informative line of an exception message (TorchScript puts it last, after a traceback)."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if not s:
        return type(e).__name__
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    if "TorchScript interpreter" in lines[0] and len(lines) > 1:
        last = lines[-1]
        return re.sub(r"^\w+(Error|Exception): ", "", last)
    return lines[0]


def _load_error(e):
    """torch.load's reason in a few words (its weights_only messages bury it under advice)."""
    m = re.search(r"(Unsupported operand \S+|Unsupported global: GLOBAL \S+)", str(e))
    return m.group(1) if m else f"{type(e).__name__}: {_first_line(e)}"


def _unpickling_reason(e):
    """The useful line of torch.load(weights_only=True)'s refusal, e.g. 'Unsupported global: GLOBAL x.Y ...'."""
    m = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand[^\n.]*)", str(e))
    return m.group(1) if m else _first_line(e)


# ----------------------------------------------------------------------------------------------------------
# TorchScript: hooks through the compiled graph
# ----------------------------------------------------------------------------------------------------------

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

    def forward(self, x):
        return x

    def extra_repr(self):
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
            self.tap_error = f"{type(e).__name__}: {_first_line(e)}"
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
    def forward(self, *args):
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

    def train(self, mode=True):
        self.script.train(mode)
        return super().train(mode)

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        return self.script.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        return self.script.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs):
        return self.script.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
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

    def extra_repr(self):
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


def hookable(model):
    """``model`` itself, or a :class:`TorchScriptModel` around it if it is a TorchScript module."""
    if isinstance(model, TorchScriptModel) or not isinstance(model, torch.jit.ScriptModule):
        return model
    return TorchScriptModel(model)


# ----------------------------------------------------------------------------------------------------------
# the workflow: models of tasks, trained by the study or given by the user
# ----------------------------------------------------------------------------------------------------------

def find_output_layer(model, input_shape, device="cpu"):
    """The module that produces the model's output (the class logits): the innermost module whose output
    *is* the tensor the model returns (for a wrapped TorchScript module: the last leaf module whose output
    equals it), on one zero input of ``input_shape`` (C, X, Y, Z); None if no module returns it as it is
    (e.g. a final functional op)."""
    hits = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: hits.append((name, o)))
               for name, m in model.named_modules() if name]
    try:
        with _eval_mode(model), torch.no_grad():
            out = model(torch.zeros((1,) + tuple(input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
    for name, o in hits:  # hooks fire innermost first
        if o is out:
            return name
    # a wrapped TorchScript module returns its graph's tensor, not the one a hook sees: compare values
    leaves = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    same = [n for n, o in hits if n in leaves and torch.is_tensor(o) and o.shape == out.shape and torch.equal(o, out)]
    return same[-1] if same else None


def task_model(job, device="cpu"):
    """A job's model: ``job.input["model"]`` loaded as the spec in ``job.params["model"]`` says (a study
    checkpoint when there is none); returns ``(model, info)``."""
    spec = {**(job.params.get("model") or {"format": "brainfv"}), "checkpoint": job.input["model"]}
    where = job.params.get("model_key", "model")
    return load_model(spec, device=device, where=where)


def describe_job(job):
    """The ``describe_model`` rule, for a task whose model the user gives: load it, check it against the cohort
    grid (its stated input and a probe forward), find its output layer, and write what the other rules need
    (``info``: JSON with task, target, classes, output_layer, format, cohort) and its layers (``units``: TSV).

    Inputs: ``model`` and the dataset's ``participants``, ``reference``. Params: ``task``, ``target``,
    ``model`` (the spec without ``checkpoint``), ``model_key`` (its config key).
    """
    import nibabel as nib
    import pandas as pd

    from .arch import resolve_units
    from .config import task_requests
    from .data.grid import Grid
    from .featviz.units import describe_units
    from .utils import atomic_path, write_json

    p, log = job.params, job.log
    where = p["model_key"]
    model, info = task_model(job)
    grid = Grid.from_image(nib.load(job.input["reference"]))
    parts = pd.read_csv(job.input["participants"], sep="\t", dtype=str)
    if p["target"] not in parts:
        raise ConfigError(f"tasks.{p['task']}.target: column {p['target']!r} is not in the dataset's participants "
                          f"table (columns: {list(parts.columns)})")
    values = sorted(parts.loc[parts["split"] == "train", p["target"]].dropna().unique())
    if not info.get("classes"):  # a brainfv checkpoint stores them; any other file cannot say its output order
        raise ConfigError(f"{where}.classes: not given; list the model's outputs in order as values of the target "
                          f"column {p['target']!r} (e.g. {values}): without it a male logit could be read as female")
    classes = list(info["classes"])
    out_shape = check_model_dataset(model, {**info, "classes": classes}, grid, where=where, log=log)
    unknown = [c for c in classes if c not in set(parts[p["target"]].dropna())]
    if unknown:
        raise ConfigError(f"{where}.classes: {unknown} never occur in the task's target column {p['target']!r} "
                          f"(values: {values}); name the model's outputs with the dataset's labels")
    channels = int((info.get("input") or {}).get("channels") or 1)
    out_layer = p["model"].get("output_layer") or find_output_layer(model, (channels,) + tuple(grid.shape))
    if out_layer is None:
        log("no module returns the model's output as it is: class-logit metrics and attributions are left out")
    rows = describe_units(model, (channels,) + tuple(grid.shape))
    names = {r["layer"] for r in rows} | {n for n, _ in hookable(model).named_modules() if n}
    # the layers the config asks of this task (read from the run's config, not a param: adding a request
    # must not rerun this job, whose model.json every visualization of the task depends on)
    requests = task_requests(job.config, p["task"]) if job.config else {}
    wanted = [r["layer"] for r in requests.values()]
    unknown = [layer for layer in dict.fromkeys(wanted) if layer not in names]
    if unknown:  # before any visualization job starts, not in one of them
        raise ConfigError(f"featviz.layers: {unknown} are not layers of {where} (its layers: "
                          f"{', '.join(r['layer'] for r in rows)}; `brainfv units {info['checkpoint']}` lists them "
                          "with their shapes)")
    n_units = {r["layer"]: r["channels"] for r in rows if r["channels"]}
    for lid, spec in requests.items():  # and the units, against the layer's real channel count
        if spec["layer"] in n_units:
            resolve_units(spec.get("units", "all"), n_units[spec["layer"]], where=(
                f"featviz.layers[{lid}].units (layer {spec['layer']!r} of {where} has {n_units[spec['layer']]} units)"))
    with atomic_path(job.output["units"]) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    cohort = str(parts["cohort"].iloc[0]) if "cohort" in parts else ""
    write_json({"task": p["task"], "target": p["target"], "classes": classes, "output_layer": out_layer,
                "format": info["format"], "architecture": info.get("architecture"), "checkpoint": info["checkpoint"],
                "n_parameters": info.get("n_parameters"), "output_shape": list(out_shape or ()), "cohort": cohort,
                "role": "provided", "notes": info.get("notes", []), "modules": sorted(names)}, job.output["info"])
    log(f"task {p['task']}: {info['format']} model {info.get('architecture')} ({info.get('n_parameters')} parameters), "
        f"classes {classes}, output layer {out_layer!r}; {len(rows)} layers listed in {job.output['units']}")
