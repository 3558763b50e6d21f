"""One visualization job of the study: a task's model, one layer, its units, one regularizer preset.

:func:`visualize_layer` optimises every unit of a layer (× seeds) in one batch and measures the
results; :func:`visualize_job` is what the workflow's ``visualize`` rule runs (read the declared
inputs, call it, write the outputs atomically). Both are usable without Snakemake.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import Preset, default
from ..errors import ConfigError
from ..utils import stable_seed
from . import objectives as O
from .metrics import correlation, image_stats
from .render import render

__all__ = ["make_objective", "unit_seeds", "objective_values", "real_activations", "split_volumes", "region_of",
           "parse_region", "LayerResult", "visualize_layer", "visualize_job"]


def make_objective(layer, channels, kind="channel"):
    """The objective named in config (``featviz.layers[].objective``) for ``channels`` of ``layer``:
    ``channel`` (mean of the feature map), ``neuron`` (its centre), ``probability`` (softmax of a class) or
    ``contrast`` (a class's logit minus the mean of the others')."""
    if kind == "channel":
        return O.channel(layer, channels)
    if kind == "neuron":
        return O.neuron(layer, channels)
    if kind == "probability":
        return O.class_probability(channels, layer)
    if kind == "contrast":
        return O.class_contrast(channels, layer)
    raise ConfigError(f"featviz objective must be channel, neuron, probability or contrast; got {kind!r}")


def unit_seeds(seed, layer, regularizer, units, n_seeds):
    """One seed per (optimisation seed, unit), seed-major: stable keys without the task, so every task's model
    (and the randomized control) starts from the same images with the same random transforms, and any unit
    can be rerun alone."""
    return [stable_seed(seed, "featviz", layer, regularizer, u, s) for s in range(n_seeds) for u in units]


@torch.no_grad()
def objective_values(model, volumes, layer, units, kind="channel", device="cpu", batch=4):
    """Objective values of ``units`` on volumes: array (n_volumes, n_units), one forward per batch."""
    from .units import capture_activations

    objs = [make_objective(layer, u, kind) for u in units]
    out = []
    for i in range(0, len(volumes), batch):
        x = torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in volumes[i:i + batch]]))[:, None]
        acts = capture_activations(model, x.to(device), objs[0].layers)
        out.append(np.stack([o(acts).float().cpu().numpy() for o in objs], 1))
    return np.concatenate(out) if out else np.zeros((0, len(units)), np.float32)


real_activations = objective_values  # the name used for real volumes


@torch.no_grad()
def own_objective_values(model, volumes, layer, channels, kind="channel", device="cpu", batch=4):
    """Volume ``b``'s objective on its own unit ``channels[b]``: array (n_volumes,)."""
    from .units import capture_activations

    obj = make_objective(layer, list(channels), kind)
    out = []
    for i in range(0, len(volumes), batch):
        x = torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in volumes[i:i + batch]]))[:, None]
        out.append(obj(capture_activations(model, x.to(device), obj.layers), slice(i, i + len(x))).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def starting_volume(preset, real_volumes, init_volumes, template=None):
    """The image a preset starts from, if not noise: the mean training volume (``init: volume``), the
    template (``template``) or the first of ``init_volumes`` (``subject``: feature accentuation; the study
    passes the validation split, so no test volume, which the metrics use as references, is a start image).
    It depends on the data only, so the trained network and every control start from the same image."""
    if preset.init == "volume":
        return np.mean([np.asarray(v, np.float32) for v in real_volumes], axis=0)
    if preset.init == "template":
        if template is None:
            raise ConfigError("init 'template' needs the grid's template image")
        return np.asarray(template, np.float32)
    if preset.init == "subject":
        if not len(init_volumes):
            raise ConfigError("init 'subject' needs a subject to start from (init_volumes: the validation split)")
        return np.asarray(init_volumes[0], np.float32)
    return None


def split_volumes(dataset, split, n=None):
    """The volumes of one split of a dataset (in participants order; the first ``n`` when given)."""
    parts = dataset.participants
    rows = parts.loc[parts["split"] == split, "index"].to_numpy()
    if n is not None:
        rows = rows[:n]
    vols = dataset.volumes
    return [vols[int(i)] for i in rows]


def region_of(box, shape):
    """The optimised region (slices): the receptive-field crop, or the whole volume."""
    return tuple(box) if box is not None else tuple(slice(0, n) for n in shape)


def region_text(region):
    return ",".join(f"{s.start}:{s.stop}" for s in region)


def parse_region(text):
    """Inverse of :func:`region_text`: ``"a:b,c:d,e:f"`` → slices."""
    return tuple(slice(*map(int, part.split(":"))) for part in str(text).split(","))


@dataclass
class LayerResult:
    """What :func:`visualize_layer` returns: every volume (seeds × units × X × Y × Z, seed-major like the batch),
    a table with one row per unit and seed, the trajectory (seed 0) and the optimisation's result."""

    images: np.ndarray
    table: "pd.DataFrame"
    trajectory: "pd.DataFrame"
    result: object
    region: tuple


def visualize_layer(model, layer, units, preset, *, shape, mask, real_volumes, test_volumes, seed, task,
                    regularizer, steps=default("featviz.steps"), lr=default("featviz.lr"),
                    n_seeds=default("featviz.seeds"), objective="channel", device="cpu", micro_batch=None, log=None,
                    record_every=8, network="trained", layer_id=None, template=None, converge=None,
                    data_range=None, init_volumes=None):
    """Optimise every unit of ``layer`` (× ``n_seeds`` seeds) in one batch and measure each result.

    Per unit and seed: the objective at start and end; the activation at *matched amplitude*
    (``act_matched``: the visualization rescaled to the standard deviation real test volumes have in the
    optimised region, then scored; ``act_matched_z``/``act_matched_pct``: against the unit's values on the
    real test volumes, which a value of 0 / 0.5 would match); image statistics inside the optimised region
    (``region``: the receptive-field crop or the whole volume); ``stability`` (mean correlation, inside the
    mask, between the unit's volumes from different seeds). ``layer_id`` names the request in seeds and
    tables (default: the layer; e.g. ``classifier-contrast``). ``steps`` (run) and ``converged`` (the plateau
    criterion held, :class:`~brainfv.featviz.render.Converge`) per element; ``init_volumes``: the volumes
    ``init: subject`` starts from (default ``test_volumes``; the study passes the validation split).
    """
    import pandas as pd

    preset = Preset.from_config(preset)
    layer_id = layer_id or layer
    units = list(units)
    seeds = unit_seeds(seed, layer_id, regularizer, units, n_seeds)
    obj = make_objective(layer, units * n_seeds, objective)
    init_volume = starting_volume(preset, real_volumes, test_volumes if init_volumes is None else init_volumes,
                                  template)
    res = render(model, obj, shape, preset, steps=steps, lr=lr, seeds=seeds, device=device, mask=mask,
                 real_volumes=real_volumes, init_volume=init_volume, micro_batch=micro_batch, log=log,
                 record_every=record_every, converge=converge, data_range=data_range)
    n = len(units)
    imgs = res.images.reshape(n_seeds, n, *shape)
    region = region_of(res.box, shape)
    in_region = np.zeros(shape, bool)
    in_region[region] = True
    m = (np.asarray(mask, bool) if mask is not None else np.ones(shape, bool)) & in_region
    real = objective_values(model, test_volumes, layer, units, objective, device) if len(test_volumes) else None
    real_sd_region = float(np.mean([np.asarray(v)[m].std() for v in test_volumes])) if len(test_volumes) else 1.0
    scaled = []
    for s in range(n_seeds):
        for j in range(n):
            sd = imgs[s, j][m].std()
            scaled.append(imgs[s, j] * (real_sd_region / sd if sd > 0 else 0.0))
    matched = own_objective_values(model, scaled, layer, units * n_seeds, objective, device).reshape(n_seeds, n)
    rows = []
    for j, u in enumerate(units):
        stab = [correlation(imgs[a, j], imgs[b, j], mask) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
        r = real[:, j] if real is not None else np.array([np.nan])
        rsd = float(r.std()) if real is not None and len(r) > 1 else float("nan")
        for s in range(n_seeds):
            b = s * n + j
            st = image_stats(imgs[s, j][region], np.asarray(mask)[region] if mask is not None else None)
            am = float(matched[s, j])
            rows.append({
                "task": task, "layer": layer_id, "module": layer, "unit": u, "seed": s, "network": network,
                "regularizer": regularizer, "objective": objective, "volume": b, "seed_value": seeds[b],
                "objective_start": float(res.objective_start[b]), "objective_end": float(res.objective_end[b]),
                "real_max": float(np.max(r)), "real_mean": float(np.mean(r)), "real_sd": rsd,
                "act_matched": am, "act_matched_z": (am - float(np.mean(r))) / rsd if rsd and rsd > 0 else float("nan"),
                "act_matched_pct": float((r < am).mean()) if real is not None else float("nan"),
                "stability": float(np.mean(stab)) if stab else float("nan"), "region": region_text(region),
                "region_voxels": int(m.sum()), **st,
                "steps": int(res.info["steps_run"][b]), "converged": bool(res.info["converged"][b]),
                "seconds": res.seconds, "steps_per_s": res.steps_per_s, "batch": len(seeds)})
    traj = pd.DataFrame([{"unit": u, "step": int(step), "objective": float(res.trajectory[t, j])}
                         for t, step in enumerate(res.trajectory_steps) for j, u in enumerate(units)])
    return LayerResult(imgs, pd.DataFrame(rows), traj, res, region)


def visualize_job(job):
    """The ``visualize`` / ``visualize_unit`` rule.

    Inputs: ``model`` (loaded as param ``model``, a model spec, says; a study checkpoint without one) and the
    task's dataset files (``participants``, ``volumes``,
    ``mask``, ``reference``). Param ``request``: ``task, layer (the request's id), module, regularizer, units,
    objective, preset, steps, lr, n_seeds, n_real, micro_batch, device, seed, randomized`` and ``only_unit``
    (write that unit alone; the request is the layer's, so its volumes are the ones the layer's job writes).
    Outputs: ``nifti`` (4D on the dataset grid: seeds × units, seed-major; for ``only_unit`` that unit's seeds),
    ``table`` (one row per network, unit and seed), and for whole layers ``trajectory`` and, with
    ``randomized``, ``randomized`` (the same request optimised on the network with re-initialised weights).
    With ``cascade`` (output and request key), also ``cascade`` (4D: cascade steps × units, first seed only)
    and ``cascade_table``: the request on every step of the cascading randomization
    (:func:`~brainfv.featviz.controls.cascade`, top layer first; the last step is the randomized network).
    Every network starts from the same images (same seeds, same ``init`` volume: the validation split's
    first subject for ``init: subject``) and is optimised to the plateau criterion ``converge``.
    """
    import pandas as pd

    from ..data.store import Dataset
    from ..device import pick_device
    from ..model_io import task_model
    from ..utils import atomic_path, stable_seed
    from .controls import cascade, randomized_copy

    torch.set_num_threads(job.threads)
    p, log = job.params["request"], job.log
    device = pick_device(p["device"])
    model, _ = task_model(job, device)
    ds = Dataset(job.folder("participants", "volumes", "mask", "reference"))
    grid = ds.grid
    units = resolve_request_units(model, p, grid.shape, device)
    real, test = split_volumes(ds, "train", p["n_real"]), split_volumes(ds, "test")
    val = split_volumes(ds, "val", 1)  # init: subject starts here (the same image for every network)
    networks = [("trained", model)]
    control_seed = stable_seed(p["seed"], "randomized", p["task"])
    if p.get("randomized") and p.get("only_unit") is None:
        networks.append(("randomized", randomized_copy(model, control_seed)))
    tables, trajs, volumes = [], [], {}
    for name, net in networks:
        log(f"task {p['task']} {p['layer']} ({p['module']}) units {units} regularizer {p['regularizer']} "
            f"{preset_text(p['preset'])} on the {name} network ({p['n_seeds']} seeds each, batch {len(units) * p['n_seeds']}, "
            f"{p['steps']} steps, device {device})")
        r = visualize_layer(net.to(device), p["module"], units, p["preset"], shape=grid.shape, mask=ds.mask,
                            real_volumes=real, test_volumes=test, seed=p["seed"], task=p["task"],
                            regularizer=p["regularizer"], steps=p["steps"], lr=p["lr"], n_seeds=p["n_seeds"],
                            objective=p["objective"], device=device, micro_batch=p.get("micro_batch"), log=log,
                            network=name, layer_id=p["layer"], template=np.asarray(ds.reference.dataobj, np.float32),
                            converge=p.get("converge"), init_volumes=val)
        imgs, table = r.images, r.table
        if p.get("only_unit") is not None:  # visualize_unit: the requested unit's seeds only
            j = units.index(p["only_unit"])
            imgs = imgs[:, j:j + 1]
            table = table[table["unit"] == p["only_unit"]].assign(volume=lambda t: t["seed"])
        volumes[name] = imgs.reshape((-1,) + tuple(grid.shape))
        tables.append(table)
        trajs.append(r.trajectory.assign(network=name))
        log(f"{name}: {len(units)} units x {p['n_seeds']} seeds in {r.result.seconds:.1f}s "
            f"({r.result.steps_per_s:.2f} steps/s); objective mean {np.mean(r.result.objective_start):.3f} -> "
            f"{np.mean(r.result.objective_end):.3f}")
    if job.output.get("cascade"):  # the cascade at the first seed: steps x units (an unused output is [])
        steps, ctables = [], []
        for k, (stages, net) in enumerate(cascade(model, control_seed)):
            r = visualize_layer(net.to(device), p["module"], units, p["preset"], shape=grid.shape, mask=ds.mask,
                                real_volumes=real, test_volumes=test, seed=p["seed"], task=p["task"],
                                regularizer=p["regularizer"], steps=p["steps"], lr=p["lr"], n_seeds=1,
                                objective=p["objective"], device=device, micro_batch=p.get("micro_batch"), log=log,
                                network=f"cascade-{k + 1}", layer_id=p["layer"],
                                template=np.asarray(ds.reference.dataobj, np.float32), converge=p.get("converge"),
                                init_volumes=val)
            steps.append(r.images[0])
            ctables.append(r.table.assign(cascade_step=k + 1, randomized_stages=",".join(stages),
                                          volume=lambda t, k=k: k * len(units) + t["volume"]))
            log(f"cascade step {k + 1} (randomized {', '.join(stages)}): {r.result.seconds:.1f}s")
        volumes["cascade"] = np.concatenate(steps)
        with atomic_path(job.output["cascade_table"]) as tmp:
            pd.concat(ctables, ignore_index=True).to_csv(tmp, sep="\t", index=False)
    for key, name in (("nifti", "trained"), ("randomized", "randomized"), ("cascade", "cascade")):
        if job.output.get(key):
            img = grid.to_nifti(np.moveaxis(volumes[name], 0, -1))
            img.header["descrip"] = f"brainfv {p['task']} {p['layer']} {p['regularizer']} {name}"[:79].encode()
            with atomic_path(job.output[key]) as tmp:
                img.to_filename(tmp)
    with atomic_path(job.output["table"]) as tmp:
        pd.concat(tables, ignore_index=True).to_csv(tmp, sep="\t", index=False)
    if "trajectory" in job.output:
        with atomic_path(job.output["trajectory"]) as tmp:
            pd.concat(trajs, ignore_index=True).assign(task=p["task"], layer=p["layer"],
                                                       regularizer=p["regularizer"]).to_csv(tmp, sep="\t", index=False)


def preset_text(preset):
    """A preset as the keys that differ from the defaults (what a user wrote), for logs."""
    full = Preset.from_config(preset).as_dict()
    base = Preset().as_dict()
    return "{" + ", ".join(f"{k}: {v}" for k, v in full.items() if base[k] != v) + "}"


def resolve_request_units(model, request, shape, device="cpu"):
    """The request's units (``all``, a count N, or a list), checked against the layer's real channel count;
    for ``only_unit``, the layer's units if it is among them (so the same batch), else the unit alone."""
    from ..arch import resolve_units
    from .units import layer_output_shape

    n = layer_output_shape(model, request["module"], (1,) + tuple(shape), device)[0]
    units = resolve_units(request["units"], n, where=f"featviz.layers[{request['layer']}].units")
    only = request.get("only_unit")
    if only is not None and only not in units:
        if not 0 <= only < n:
            raise ConfigError(f"unit {only} of layer {request['module']!r} does not exist (it has {n} channels)")
        units = [only]
    return units
