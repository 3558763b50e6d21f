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
    A checkpoint written by the study (:func:`brainfv.models.cnn.save_checkpoint`).
``auto`` (default)
    Tells TorchScript archives, brainfv checkpoints and weights apart by their content.

Every error names the config key at fault (``where``, e.g. ``tasks.mymodel.model``) and the file.
"""
from __future__ import annotations

import collections
import difflib
import importlib
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..config import node
from ..errors import ConfigError
from .cnn import load_checkpoint
from .torchscript import TorchScriptModel, first_line

__all__ = ["FORMATS", "NORMALISATIONS", "load_model", "build_architecture", "extract_state_dict", "check_model_file"]

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

def load_model(spec: dict | str, device: str | torch.device = "cpu", where: str = "model") -> tuple[nn.Module, dict]:
    """Load the model a spec describes; returns ``(model in eval mode on device, info)``.

    Parameters
    ----------
    spec : dict or str
        The model spec (see the module docstring); a bare path means ``{"checkpoint": path}``.
    device : str or torch.device
    where : str
        Config key of the spec, for error messages (e.g. ``"tasks.mymodel.model"``).

    Returns
    -------
    model : nn.Module
        In eval mode, on ``device``. A TorchScript file comes back as a :class:`TorchScriptModel` (hooks work
        on it; the raw module is ``model.script``).
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
        _no_ignored_architecture(spec, fmt, path, where)
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


def _no_ignored_architecture(spec, fmt, path, where):
    """An ``architecture`` given for a file that brings its own network is an error, never ignored in silence."""
    if spec.get("architecture") and fmt != "state_dict":
        raise ConfigError(f"{where}.architecture: {path} is a {fmt} file, which brings its own network, so "
                          f"architecture {spec['architecture']['name']!r} would not be used; remove it (it is "
                          f"only for weights-only files, format: state_dict)")


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

def check_model_file(path: str | Path, where: str = "model") -> None:
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
                          f"besides tensors (torch.load(weights_only=True) says: {_unpickling_reason(e)}). It is "
                          f"probably a whole pickled model (format: full) or a training checkpoint with extra objects. "
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
        raise ConfigError(f"{where}.checkpoint: cannot read {path}: {first_line(e)}") from e


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
        raise ConfigError(f"{where}.checkpoint: {path} is not a loadable TorchScript file ({first_line(e)}); "
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

def build_architecture(arch: dict | str, where: str = "model.architecture") -> nn.Module:
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


def extract_state_dict(ckpt: object, key: str | None = None, where: str = "model", path: str | Path | None = None,
                       notes: list | None = None) -> dict:
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



def _fmt_kwargs(kwargs):
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())



def _load_error(e):
    """torch.load's reason in a few words (its weights_only messages bury it under advice)."""
    m = re.search(r"(Unsupported operand \S+|Unsupported global: GLOBAL \S+)", str(e))
    return m.group(1) if m else f"{type(e).__name__}: {first_line(e)}"


def _unpickling_reason(e):
    """The useful line of torch.load(weights_only=True)'s refusal, e.g. 'Unsupported global: GLOBAL x.Y ...'."""
    m = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand[^\n.]*)", str(e))
    return m.group(1) if m else first_line(e)
