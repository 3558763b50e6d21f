"""What the workflow's rules (and the command line) ask of the jobs, built from the config in one place.

Torch-free (standard library, :mod:`brainfv.config`, :mod:`brainfv.models.arch`): Snakemake imports this while
it builds the DAG. The rules in
``workflow/rules/*.smk`` call these functions with the run's config; :mod:`brainfv.cli` builds its
:class:`VisualizeRequest` with the same :func:`visualize_request`, so the two cannot drift apart.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import default, layer_key, task_arch, task_replicates, task_requests
from ..errors import ConfigError
from ..models.arch import layer_units, resolve_units

__all__ = ["VisualizeRequest", "visualize_request", "exemplars_request", "provided", "model_param", "layer_spec",
           "layer_unit_count", "layer_replicates", "exemplar_layers", "exemplar_source", "check_requests",
           "checkpoint_stat"]

#: units a request of a given model counts for memory estimates when it asks for "all" (its layers are known
#: to its describe_model job, not to the DAG)
UNKNOWN_UNIT_COUNT = 16


@dataclass(frozen=True, kw_only=True)
class VisualizeRequest:
    """Everything a visualize job optimises (the ``request`` param of the ``visualize`` rules).

    ``layer`` is the request's id (:func:`brainfv.config.layer_id`), ``module`` the network's layer; ``only_unit``
    says which unit's volumes to write (the request stays its layer's, so its numbers are the layer's);
    ``positions`` how many probe positions a neuron objective at ``position: lesions`` reads (each unit is
    optimised at each); ``replicate`` which trained network of the task it runs on (``training.replicates``;
    0: ``models/{task}/main``): each replicate draws its own start images, random transforms and re-initialised control
    (:func:`brainfv.jobs.featviz.replicate_seed`), shared with the other tasks' networks of the same index."""

    only_unit: int | None = None
    task: str
    layer: str
    module: str
    regularizer: str
    units: object  # "all", a count, or a list of channels
    objective: str
    preset: dict
    steps: int
    lr: float
    n_seeds: int
    n_real: int
    micro_batch: int | None
    device: str
    seed: int
    randomized: bool
    converge: dict = dataclasses.field(default_factory=dict)  # the plateau criterion (featviz.converge)
    # where a neuron objective reads: centre, lesions or [x, y, z] mm (featviz.probes)
    position: object = default("featviz.layers.position")
    # how many probe positions (position: lesions; featviz.probes.probe_positions)
    positions: int = default("featviz.layers.positions")
    replicate: int = 0  # the task's trained network (training.replicates)
    amp: bool | None = None  # bf16 autocast (featviz.amp; None: brainfv.device.autocast_default)

    def as_dict(self) -> dict:
        """Plain data, in field order (a rule's param: Snakemake compares it between runs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> VisualizeRequest:
        """The request a job was given; a missing or unknown key is named."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d) - {"only_unit", "replicate", "converge",
                                                                                        "position", "positions", "amp"})
        if unknown or missing:
            raise ConfigError(f"visualize request: unknown keys {unknown}, missing keys {missing}")
        return cls(**d)


def visualize_request(cfg: dict, *, task: str, layer: str, spec: dict, regularizer: str, preset: dict | None = None,
                      only_unit: int | None = None, steps: int | None = None, lr: float | None = None,
                      n_seeds: int | None = None, device: str | None = None, seed: int | None = None,
                      randomized: bool | None = None, replicate: int = 0) -> VisualizeRequest:
    """The request ``layer`` (id) of ``task`` under preset ``regularizer``, from a completed config.

    ``spec`` is the ``featviz.layers`` entry (``layer``, ``units``, ``objective``, optional ``seeds``); the
    preset is the config's ``featviz.regularizers[regularizer]`` unless given. The other keyword arguments
    override the config's value where not None (the command line's options)."""
    fv = cfg["featviz"]

    def pick(value, default):
        return default if value is None else value

    return VisualizeRequest(
        only_unit=only_unit, task=task, layer=layer, module=spec["layer"], regularizer=regularizer,
        units=layer_key(spec, "units"), objective=layer_key(spec, "objective"),
        preset=pick(preset, fv["regularizers"].get(regularizer)),
        steps=pick(steps, fv["steps"]), lr=pick(lr, fv["lr"]), n_seeds=pick(n_seeds, spec.get("seeds", fv["seeds"])),
        n_real=fv["n_real"], micro_batch=fv["micro_batch"], device=pick(device, fv["device"]),
        seed=pick(seed, cfg["seed"]), randomized=pick(randomized, cfg["compare"]["randomized"]),
        converge=fv["converge"], position=layer_key(spec, "position"), positions=layer_key(spec, "positions"),
        replicate=replicate, amp=fv["amp"])


def layer_replicates(cfg: dict, task: str, layer: str) -> list[int]:
    """The trained replicates of ``task`` the request ``layer`` (an id) is visualised on: every one
    (``replicates: all``, :func:`brainfv.config.task_replicates`) or replicate 0 (``first``)."""
    if layer_key(layer_spec(cfg, task, layer), "replicates") == "first":
        return [0]
    return list(range(task_replicates(cfg, task)))


def exemplars_request(cfg: dict, task: str, layer: str) -> dict:
    """What an exemplars job needs: the request ``layer`` (id) of ``task`` and how many volumes per unit."""
    spec = layer_spec(cfg, task, layer)
    return {"task": task, "layer": layer, "module": spec["layer"], "units": layer_key(spec, "units"),
            "objective": layer_key(spec, "objective"), "k": cfg["featviz"]["exemplars"],
            "device": cfg["featviz"]["device"],
            "position": layer_key(spec, "position"), "positions": layer_key(spec, "positions")}


def provided(cfg: dict, task: str) -> bool:
    """Whether ``task`` visualises a model the user gives (``tasks.<task>.model``) instead of training one."""
    return task in cfg["tasks"] and "model" in cfg["tasks"][task]


def model_param(cfg: dict, task: str) -> dict:
    """How jobs load ``task``'s model (:func:`brainfv.models.load.load_model`): the user's spec without its
    checkpoint (a rule input), or a study checkpoint."""
    if provided(cfg, task):
        return {k: v for k, v in cfg["tasks"][task]["model"].items() if k != "checkpoint"}
    return {"format": "brainfv"}


def layer_spec(cfg: dict, task: str, layer: str) -> dict:
    """The request ``layer`` (an id) of ``task``."""
    specs = task_requests(cfg, task)
    if layer not in specs:
        raise ConfigError(f"{layer!r} is not visualised for task {task!r} (config key featviz.layers); "
                          f"requests: {list(specs)}")
    return specs[layer]


def layer_unit_count(cfg: dict, task: str, layer: str) -> int:
    """How many units a request asks for (for memory estimates; the job resolves them on the real model). For
    a given model a count or list is taken as it is and "all" counts :data:`UNKNOWN_UNIT_COUNT`."""
    spec = layer_spec(cfg, task, layer)
    if provided(cfg, task):
        units = layer_key(spec, "units")
        if isinstance(units, list):
            return len(units)
        return units if isinstance(units, int) else UNKNOWN_UNIT_COUNT
    known = layer_units(task_arch(cfg, task))
    if spec["layer"] not in known:
        raise ConfigError(f"config key featviz.layers: layer {spec['layer']!r} is not in the model; layers: "
                          f"{list(known)}")
    return len(resolve_units(layer_key(spec, "units"), known[spec["layer"]], where=f"featviz.layers[{layer}].units"))


def exemplar_layers(cfg: dict, task: str) -> list[str]:
    """The requests of ``task`` whose units get dataset exemplars (channel and neuron objectives)."""
    if not cfg["featviz"]["exemplars"]:
        return []
    return [lid for lid, s in task_requests(cfg, task).items() if s["objective"] in ("channel", "neuron")]


def exemplar_source(cfg: dict, task: str, layer: str) -> str | None:
    """The exemplars shown beside a request: its own, or those of a request on the same layer that has them."""
    layer_name = layer_spec(cfg, task, layer)["layer"]
    own = exemplar_layers(cfg, task)
    for lid in own:
        if lid == layer or (layer_spec(cfg, task, lid)["layer"] == layer_name and layer not in own):
            return lid
    return None


def check_requests(cfg: dict) -> None:
    """Every ``featviz.layers`` request names a layer of each of its tasks' models and units within it; raise
    :class:`ConfigError` naming the request's key, before any job (``workflow/rules/common.smk`` runs it when the
    workflow loads, after :func:`brainfv.config.check`).

    A trained task's layers come from the torch-free layer table (:func:`brainfv.models.arch.layer_units` of
    the task's architecture, :func:`brainfv.config.task_arch`; the
    classifier has two units for the ``sex`` and ``lesion`` targets, an unknown number otherwise). A given
    model's (``tasks.<task>.model``) come from its ``describe_model`` outputs (``model.json`` and
    ``units.tsv`` under ``results``) once they exist; before that, that job checks them, ahead of every
    visualization of the task. ``positions`` > 1 needs ``objective: neuron`` with ``position: lesions`` (whether
    that many positions fit is known once the model and the lesion frequency map exist: the job says).
    """
    for i, spec in enumerate(cfg["featviz"]["layers"]):
        k, objective, position = (layer_key(spec, key) for key in ("positions", "objective", "position"))
        if k != 1 and (objective != "neuron" or position != "lesions"):
            raise ConfigError(f"config key featviz.layers[{i}].positions: {k} probe positions need objective: neuron "
                              f"with position: lesions (this request: objective {objective}, "
                              f"position {position!r}, one place)")
        for task in spec.get("tasks", list(cfg["tasks"])):
            tcfg = cfg["tasks"][task]
            if "model" in tcfg:
                what = f"tasks.{task}.model"
                units = _described_units(Path(cfg["results"]) / "models" / task / "provided", tcfg["model"])
                if units is None:
                    continue
            else:
                what = "the study's model (config: model)"
                n_classes = 2 if tcfg.get("target") in ("sex", "lesion") else None
                units = layer_units(task_arch(cfg, task), n_classes)
            layer = spec["layer"]
            if layer not in units:
                shown = [f"{k} ({v})" if v is not None else k for k, v in units.items()]
                raise ConfigError(f"config key featviz.layers[{i}].layer: {layer!r} is not a layer of {what} "
                                  f"(task {task!r}); layers (units): {', '.join(shown)}")
            if units[layer] is not None:
                resolve_units(layer_key(spec, "units"), units[layer], where=(
                    f"config key featviz.layers[{i}].units (layer {layer!r} of {what} has {units[layer]} units, "
                    f"task {task!r})"))


def _described_units(folder: Path, spec: dict) -> dict | None:
    """``{layer: channels or None}`` of a given model, from its describe_model outputs; None before they exist
    or when they describe another file (a changed checkpoint: describe_model runs again and checks)."""
    info, table = folder / "model.json", folder / "units.tsv"
    ck = Path(spec.get("checkpoint", "")).expanduser()
    if not (info.exists() and table.exists() and ck.is_file()) or ck.stat().st_mtime > info.stat().st_mtime:
        return None
    described = json.loads(info.read_text())
    if Path(described.get("checkpoint", "")).resolve() != ck.resolve():
        return None
    if described.get("checkpoint_stat") not in (None, checkpoint_stat(ck)):  # replaced, also with its old mtime
        return None
    units = dict.fromkeys(described.get("modules") or [])
    with open(table, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            ch = row.get("channels")
            units[row["layer"]] = int(float(ch)) if ch not in (None, "", "nan") else None
    return units


def checkpoint_stat(path: str | Path) -> list[int]:
    """Size, modification and change time (ns) of a model file: a copy that keeps the old modification time
    (cp -p, rsync -a, a restore) still changes the change time."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
