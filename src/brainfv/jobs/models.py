"""Jobs of the models a task visualises: loading a task's model, and the ``describe_model`` rule."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pandas as pd
import torch
from torch import nn

from ..config import layer_key, task_requests
from ..data.grid import Grid
from ..errors import ConfigError
from ..featviz.units import describe_units
from ..models.arch import resolve_units
from ..models.checks import check_model_dataset, find_output_layer
from ..models.load import load_model
from ..models.positive import construct_positive_control
from ..models.torchscript import hookable
from ..utils import atomic_path, write_json
from .base import Job
from .requests import checkpoint_stat

__all__ = ["task_model", "describe_job", "positive_control_job"]


def task_model(job: Job, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A job's model: ``job.input["model"]`` loaded as the spec in ``job.params["model"]`` says (a study
    checkpoint when there is none); returns ``(model, info)``."""
    spec = {**(job.params.get("model") or {"format": "brainfv"}), "checkpoint": job.input["model"]}
    where = job.params.get("model_key", "model")
    return load_model(spec, device=device, where=where)


def describe_job(job: Job) -> None:
    """The ``describe_model`` rule, for a task whose model the user gives: load it, check it against the cohort
    grid (its stated input and a probe forward), find its output layer, and write what the other rules need
    (``info``: JSON with task, target, classes, output_layer, format, cohort) and its layers (``units``: TSV).

    Inputs: ``model`` and the dataset's ``participants``, ``reference``. Params: ``task``, ``target``,
    ``model`` (the spec without ``checkpoint``), ``model_key`` (its config key).
    """
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
    _check_requested_layers(job, where, rows, names, info)
    with atomic_path(job.output["units"]) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    cohort = str(parts["cohort"].iloc[0]) if "cohort" in parts else ""
    write_json({"task": p["task"], "target": p["target"], "classes": classes, "output_layer": out_layer,
                "format": info["format"], "architecture": info.get("architecture"), "checkpoint": info["checkpoint"],
                "checkpoint_stat": checkpoint_stat(info["checkpoint"]),
                "n_parameters": info.get("n_parameters"), "output_shape": list(out_shape or ()), "cohort": cohort,
                "role": "provided", "notes": info.get("notes", []), "modules": sorted(names)}, job.output["info"])
    log(f"task {p['task']}: {info['format']} model {info.get('architecture')} ({info.get('n_parameters')} parameters), "
        f"classes {classes}, output layer {out_layer!r}; {len(rows)} layers listed in {job.output['units']}")


def _check_requested_layers(job: Job, where: str, rows: list, names: set, info: dict) -> None:
    """The layers and units the config asks of a given model's task, against the model's (read from the run's
    config, not a param: adding a request must not rerun describe_model, whose model.json every visualization
    of the task depends on); before any visualization job starts, not in one of them."""
    requests = task_requests(job.config, job.params["task"]) if job.config else {}
    unknown = [layer for layer in dict.fromkeys(r["layer"] for r in requests.values()) if layer not in names]
    if unknown:
        raise ConfigError(f"featviz.layers: {unknown} are not layers of {where} (its layers: "
                          f"{', '.join(r['layer'] for r in rows)}; `brainfv units {info['checkpoint']}` lists them "
                          "with their shapes)")
    n_units = {r["layer"]: r["channels"] for r in rows if r["channels"]}
    for lid, spec in requests.items():  # and the units, against the layer's real channel count
        if spec["layer"] in n_units:
            resolve_units(layer_key(spec, "units"), n_units[spec["layer"]], where=(
                f"featviz.layers[{lid}].units (layer {spec['layer']!r} of {where} has {n_units[spec['layer']]} units)"))


def positive_control_job(job: Job) -> None:
    """The ``construct_model`` rule: the dataset's ``participants`` and ``reference`` and what the target's
    control reads (lesion: ``lesions``, ``frequency``; sex: ``effect``, the regional sex effect, and ``mask``),
    all inputs of one dataset folder → ``model``, ``info`` and ``known`` (the known optimum) outputs.
    Params: ``task``, ``target``, ``arch``
    (the task's architecture, :func:`brainfv.config.task_arch`)."""
    p = job.params
    construct_positive_control(job.folder(*job.input.keys()), p["arch"], p["task"], p["target"],
                               Path(job.output["model"]).parent, log=job.log)
