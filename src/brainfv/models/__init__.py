"""Models: the study CNN, its torch-free layer table, loading and checking users' models, TorchScript tapping.

- :mod:`brainfv.models.cnn`          the paper-style 3D CNN, its checkpoints, :func:`frozen` copies
- :mod:`brainfv.models.arch`         the CNN's layers and unit counts without torch (the DAG reads them)
- :mod:`brainfv.models.load`         a model the user gives, from a spec (TorchScript, weights, pickled, brainfv)
- :mod:`brainfv.models.checks`       a model against the cohort grid: stated input, probe forward, output layer
- :mod:`brainfv.models.torchscript`  TorchScript models that forward hooks work on; :class:`eval_mode`

``from brainfv.models import build_model, load_model, ...`` works for every public name. The names are
imported on first use, so ``brainfv.models.arch`` stays importable without torch (Snakemake imports it
while it builds the DAG).
"""
from __future__ import annotations

__all__ = ["ConvBlock", "BrainCNN", "build_model", "flatten_shape", "frozen", "save_checkpoint", "load_checkpoint",
           "layer_units", "n_units", "FORMATS", "NORMALISATIONS", "load_model", "build_architecture",
           "extract_state_dict", "check_model_file", "check_model_input", "check_model_dataset", "find_output_layer",
           "TorchScriptModel", "hookable", "eval_mode"]

_HOME = {"ConvBlock": "cnn", "BrainCNN": "cnn", "build_model": "cnn", "flatten_shape": "cnn", "frozen": "cnn",
         "save_checkpoint": "cnn", "load_checkpoint": "cnn", "layer_units": "arch", "n_units": "arch",
         "FORMATS": "load", "NORMALISATIONS": "load", "load_model": "load", "build_architecture": "load",
         "extract_state_dict": "load", "check_model_file": "load", "check_model_input": "checks",
         "check_model_dataset": "checks", "find_output_layer": "checks", "TorchScriptModel": "torchscript",
         "hookable": "torchscript", "eval_mode": "torchscript"}


def __getattr__(name: str) -> object:
    """A public name of a submodule, imported when first asked for (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'brainfv.models' has no attribute {name!r}")
    # explicit imports (not importlib) so that brainfv.provenance, which reads imports statically, follows them
    from . import arch, checks, cnn, load, torchscript

    value = getattr({"arch": arch, "checks": checks, "cnn": cnn, "load": load,
                     "torchscript": torchscript}[_HOME[name]], name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
