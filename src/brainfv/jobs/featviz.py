"""Jobs of the feature-visualization rules: ``visualize`` (and ``visualize_unit``) and ``exemplars``."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import layer_key
from ..data.grid import Grid
from ..data.store import Dataset
from ..device import pick_device
from ..featviz.controls import cascade, randomized_copy
from ..featviz.exemplars import top_exemplars, write_exemplars
from ..featviz.probes import request_position, request_positions
from ..featviz.study import join_positions, preset_text, resolve_request_units, split_volumes, visualize_positions
from ..models.checks import check_model_dataset
from ..utils import atomic_path, stable_seed
from .base import Job, retains_freed_memory
from .models import task_model
from .requests import VisualizeRequest

__all__ = ["replicate_seed", "visualize_job", "exemplars_job"]


@retains_freed_memory
def visualize_job(job: Job) -> None:
    """The ``visualize`` / ``visualize_unit`` rule.

    Inputs: ``model`` (loaded as param ``model``, a model spec, says; a study checkpoint without one) and the
    task's dataset files (``participants``, ``volumes``,
    ``mask``, ``reference``). Param ``request``: ``task, layer (the request's id), module, regularizer, units,
    objective, preset, steps, lr, n_seeds, n_real, micro_batch, device, seed, randomized, replicate, position,
    positions`` and ``only_unit``
    (write that unit alone; the request is the layer's, so its volumes are the ones the layer's job writes).
    Outputs: ``nifti`` (4D on the dataset grid: seeds × units, seed-major; for ``only_unit`` that unit's seeds),
    ``table`` (one row per network, unit and seed), and for whole layers ``trajectory`` and, with
    ``randomized``, ``randomized`` (the same request optimised on the network with re-initialised weights).
    With a ``cascade`` output, also ``cascade`` (4D: cascade steps × units, first seed) and ``cascade_table``: the
    request on every step of the cascading randomization (top layer first). Every network starts from the same
    images (same seeds; the validation split's first subject for ``init: subject``) and is optimised to the
    plateau criterion ``converge``; a neuron request reads the map at its ``position`` (``position_map``: the
    lesion frequency), and each unit's preferred class is measured on validation volumes (:func:`request_probe`).
    With ``positions: K`` every network optimises each unit at each of the K probe positions (one optimisation per
    position, its own receptive-field crop and seeds, :func:`~brainfv.featviz.study.visualize_positions`): the
    volumes hold K × seeds per unit, position-major (seed ``i * n_seeds + s`` is position ``i``'s seed ``s``; rows
    have ``position_index``), the trajectory is the first position's, the cascade has K × units volumes per step.
    """
    torch.set_num_threads(job.threads)
    p = VisualizeRequest.from_dict(job.params["request"]).as_dict()
    device = pick_device(p["device"])
    model, info = task_model(job, device)
    p["amp"] = request_precision(p, info, job.log)
    ds = Dataset(job.folder("participants", "volumes", "mask", "reference"))
    check_model_dataset(model, info, ds.grid, where=job.params.get("model_key", "model"), log=job.log,
                        dataset=f"the dataset {Path(job.input['volumes']).parent}")
    units = resolve_request_units(model, p, ds.grid.shape, device)
    data = {"real": split_volumes(ds, "train", p["n_real"]), "test": split_volumes(ds, "test"),
            "init": split_volumes(ds, "val", 1),  # init: subject starts here (the same image for every network)
            "template": np.asarray(ds.reference.dataobj, np.float32)}  # read once, not per network
    data["positions"], data["labelled"] = request_probe(job, model, ds, device)
    networks = [("trained", model)]
    control_seed = stable_seed(replicate_seed(p), "randomized", p["task"])
    if p.get("randomized") and p.get("only_unit") is None:
        networks.append(("randomized", randomized_copy(model, control_seed)))
    tables, trajs, volumes = [], [], {}
    for name, net in networks:
        volumes[name], table, traj = _visualize_network(net.to(device), name, p, units, ds, data, device, job.log)
        tables.append(table)
        trajs.append(traj)
    if job.output.get("cascade"):  # an empty list when featviz.cascade is off
        volumes["cascade"] = _cascade(job, model, control_seed, p, units, ds, data, device)
    _write_visualizations(job, p, ds.grid, volumes, tables, trajs)


def request_precision(p: dict, info: dict, log: Callable) -> bool | None:
    """The request's ``amp`` (bf16 autocast; None: :func:`brainfv.device.autocast_default`), unless the model's
    checkpoint states the precision it needs (``precision: fp32``: the hand-built positive controls, whose sex
    control reads ``x + SEX_OFFSET``, an ``x`` bf16 would round away) and the request does not ask otherwise."""
    if p.get("amp") is None and (info.get("meta") or {}).get("precision") == "fp32":
        log("the model's checkpoint asks for fp32 (precision: fp32): optimised in fp32")
        return False
    return p.get("amp")


def request_probe(job: Job, model: torch.nn.Module, ds: Dataset, device: torch.device) -> tuple:
    """Where the job's neuron objective reads (request ``position`` and ``positions``: a list of map positions,
    ``[None]`` for the centre; the ``position_map`` input holds the lesion frequency for ``lesions``) and the
    labelled validation volumes (at most ``n_real``, balanced over the
    classes of the model's ``info``) on which each unit's preferred class is measured."""
    p = job.params["request"]
    position = request_positions(p, job.input.get("position_map"), model, ds.grid, device, job.log)
    info = json.loads(Path(job.input["info"]).read_text()) if job.input.get("info") else {}
    target, classes = info.get("target"), info.get("classes")
    parts = ds.participants
    if not (target in parts and classes and p["module"] != info.get("output_layer")):
        return position, None
    val = parts[parts["split"] == "val"]
    rows = val.groupby(val[target].astype(str)).head(max(p["n_real"] // len(classes), 1))
    return position, ([ds.volumes[int(i)] for i in rows["index"]], rows[target].astype(str).tolist(), classes)


def _cascade(job: Job, model: torch.nn.Module, control_seed: int, p: dict, units: list[int], ds: Dataset,
             data: dict, device: torch.device) -> np.ndarray:
    """The request at the first seed on every step of the cascading randomization (steps × units volumes; with
    several probe positions steps × positions × units, the first seed at each); writes ``cascade_table``."""
    steps, tables = [], []
    for k, (stages, net) in enumerate(cascade(model, control_seed)):
        rs = _layer(net.to(device), f"cascade-{k + 1}", {**p, "n_seeds": 1}, units, ds, data, device, job.log)
        imgs, table = join_positions(rs)
        steps.append(imgs.reshape((-1,) + imgs.shape[2:]))
        n = len(steps[-1])
        tables.append(table.assign(cascade_step=k + 1, randomized_stages=",".join(stages),
                                   volume=lambda t, k=k, n=n: k * n + t["volume"]))
        job.log(f"cascade step {k + 1} (randomized {', '.join(stages)}): {sum(r.result.seconds for r in rs):.1f}s")
    with atomic_path(job.output["cascade_table"]) as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, sep="\t", index=False)
    return np.concatenate(steps)


def replicate_seed(p: dict) -> int:
    """The seed from which a request's start images, random transforms and randomized control derive: the study
    seed for replicate 0, one of its own for each other trained replicate (so two replicates are independent
    draws of the whole hierarchy, start images and control included; the other task's network of the same
    replicate index starts from the same images, as the other-model control needs)."""
    r = int(p.get("replicate") or 0)
    return p["seed"] if r == 0 else stable_seed(p["seed"], "replicate", r)


def _layer(net: torch.nn.Module, name: str, p: dict, units: list[int], ds: Dataset, data: dict,
           device: torch.device, log: Callable) -> list:
    """:func:`~brainfv.featviz.study.visualize_layer` of the request on one network at each probe position
    (:func:`~brainfv.featviz.study.visualize_positions`): one result per position."""
    return visualize_positions(net, p["module"], units, p["preset"], positions=data["positions"],
                               shape=ds.grid.shape, mask=ds.mask, real_volumes=data["real"],
                               test_volumes=data["test"], seed=replicate_seed(p), task=p["task"],
                               regularizer=p["regularizer"], steps=p["steps"], lr=p["lr"], n_seeds=p["n_seeds"],
                               objective=p["objective"], device=device, micro_batch=p.get("micro_batch"), log=log,
                               amp=p.get("amp"), network=name, layer_id=p["layer"],
                               template=data["template"],
                               labelled=data["labelled"], converge=p.get("converge"), init_volumes=data["init"])


def _visualize_network(net: torch.nn.Module, name: str, p: dict, units: list[int], ds: Dataset,
                       data: dict, device: torch.device, log: Callable) -> tuple:
    """One network's visualizations of the request: (volumes (seeds × units, seed-major; with several probe
    positions (positions × seeds) × units), table, trajectory (the first position's)); for ``only_unit``, that
    unit's seeds only."""
    grid = ds.grid
    n_pos = len(data["positions"])
    at = f" at each of {n_pos} probe positions" if n_pos > 1 else ""
    log(f"task {p['task']} {p['layer']} ({p['module']}) units {units} regularizer {p['regularizer']} "
        f"{preset_text(p['preset'])} on the {name} network ({p['n_seeds']} seeds each{at}, "
        f"batch {len(units) * p['n_seeds']}, {p['steps']} steps, device {device})")
    rs = _layer(net, name, p, units, ds, data, device, log)
    imgs, table = join_positions(rs)
    if p.get("only_unit") is not None:  # visualize_unit: the requested unit's seeds only
        j = units.index(p["only_unit"])
        imgs = imgs[:, j:j + 1]
        table = table[table["unit"] == p["only_unit"]].assign(volume=lambda t: t["seed"])
    for i, r in enumerate(rs):
        where = f" (position {i + 1} of {n_pos}, map index {data['positions'][i]})" if n_pos > 1 else ""
        log(f"{name}{where}: {len(units)} units x {p['n_seeds']} seeds in {r.result.seconds:.1f}s "
            f"({r.result.steps_per_s:.2f} steps/s); objective mean {np.mean(r.result.objective_start):.3f} -> "
            f"{np.mean(r.result.objective_end):.3f}")
    return imgs.reshape((-1,) + tuple(grid.shape)), table, rs[0].trajectory.assign(network=name)


def _write_visualizations(job: Job, p: dict, grid: Grid, volumes: dict, tables: list, trajs: list) -> None:
    """The job's outputs: a 4D NIfTI per network, the table and (whole layers) the trajectory."""
    for key, name in (("nifti", "trained"), ("randomized", "randomized"), ("cascade", "cascade")):
        if job.output.get(key):  # a rule's unused output is an empty list
            img = grid.to_nifti(np.moveaxis(volumes[name], 0, -1))
            img.header["descrip"] = f"brainfv {p['task']} {p['layer']} {p['regularizer']} {name}"[:79].encode()
            with atomic_path(job.output[key]) as tmp:
                img.to_filename(tmp)
    with atomic_path(job.output["table"]) as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, sep="\t", index=False)
    if "trajectory" in job.output:
        with atomic_path(job.output["trajectory"]) as tmp:
            pd.concat(trajs, ignore_index=True).assign(task=p["task"], layer=p["layer"], regularizer=p["regularizer"],
                                                       replicate=p["replicate"]).to_csv(tmp, sep="\t", index=False)


@retains_freed_memory
def exemplars_job(job: Job) -> None:
    """The ``exemplars`` rule: the real test volumes that activate each unit of one layer most.

    Inputs: ``model`` and the dataset's ``participants``, ``volumes``, ``reference``. Param ``request``:
    ``task, layer (id), module, units, objective, k, device``. Outputs: ``nifti`` (units × k volumes, cropped
    to the receptive field around each unit's maximum for spatial layers) and ``table``.
    """
    torch.set_num_threads(job.threads)
    p, log = job.params["request"], job.log
    device = pick_device(p["device"])
    model, _ = task_model(job, device)
    ds = Dataset(job.folder("participants", "volumes", "reference"))
    parts = ds.participants
    rows = parts.loc[parts["split"] == "test", "index"].to_numpy()
    units = resolve_request_units(model, p, ds.grid.shape, device)
    kind = "neuron" if p["objective"] == "neuron" else "channel"
    position = request_position(p, job.input.get("position_map"), model, ds.grid, device, log)
    if int(layer_key(p, "positions")) > 1:
        log(f"exemplars read the first (most lesion-rich) of the request's {p['positions']} probe positions, "
            f"map index {position}")
    res = top_exemplars(model, ds.volumes, rows, p["module"], units, k=p["k"], kind=kind, device=device, log=log,
                        position=position)
    table = write_exemplars(res, ds.volumes, ds.grid, job.output["nifti"], None, participants=parts)
    table.insert(0, "task", p["task"])
    table.insert(1, "request", p["layer"])
    with atomic_path(job.output["table"]) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    log(f"exemplars of {len(units)} units of {p['module']} over {len(rows)} test volumes (k={p['k']})")
