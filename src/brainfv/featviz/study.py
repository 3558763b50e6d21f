"""One visualization job of the study: a task's model, one layer, its units, one regularizer preset.

:func:`visualize_layer` optimises every unit of a layer (× seeds) in one batch and measures the
results; :func:`visualize_job` is what the workflow's ``visualize`` rule runs (read the declared
inputs, call it, write the outputs atomically). Both are usable without Snakemake.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import Preset, default
from ..errors import ConfigError
from ..utils import stable_seed
from . import objectives as O
from .metrics import correlation, image_stats
from .render import render

__all__ = ["make_objective", "unit_seeds", "real_activations", "split_volumes", "visualize_layer", "visualize_job"]


def make_objective(layer, channels, kind="channel"):
    """The objective named in config (``featviz.layers[].objective``) for ``channels`` of ``layer``."""
    if kind == "channel":
        return O.channel(layer, channels)
    if kind == "neuron":
        return O.neuron(layer, channels)
    if kind == "probability":
        return O.class_probability(channels, layer)
    raise ConfigError(f"featviz objective must be channel, neuron or probability; got {kind!r}")


def unit_seeds(seed, task, layer, regularizer, units, n_seeds):
    """One seed per (unit, optimisation seed): stable keys, so any unit can be rerun alone."""
    return [stable_seed(seed, "featviz", task, layer, regularizer, u, s) for s in range(n_seeds) for u in units]


@torch.no_grad()
def real_activations(model, volumes, layer, units, kind="channel", device="cpu", batch=4):
    """Objective values of ``units`` on real volumes: array (n_volumes, n_units), one forward per batch."""
    from .units import capture_activations

    objs = [make_objective(layer, u, kind) for u in units]
    out = []
    for i in range(0, len(volumes), batch):
        x = torch.as_tensor(np.stack([np.asarray(v, np.float32) for v in volumes[i:i + batch]]))[:, None]
        acts = capture_activations(model, x.to(device), [layer])
        out.append(np.stack([o(acts).float().cpu().numpy() for o in objs], 1))
    return np.concatenate(out)


def split_volumes(dataset, split, n=None):
    """The volumes of one split of a dataset (in participants order; the first ``n`` when given)."""
    parts = dataset.participants
    rows = parts.loc[parts["split"] == split, "index"].to_numpy()
    if n is not None:
        rows = rows[:n]
    vols = dataset.volumes
    return [vols[int(i)] for i in rows]


def visualize_layer(model, layer, units, preset, *, shape, mask, real_volumes, test_volumes, seed, task,
                    regularizer, steps=default("featviz.steps"), lr=default("featviz.lr"),
                    n_seeds=default("featviz.seeds"), objective="channel", device="cpu", micro_batch=None, log=None,
                    record_every=8):
    """Optimise every unit of ``layer`` (× ``n_seeds`` seeds) in one batch.

    Returns ``(images, table, trajectory, result)``: the seed-0 volume of each unit (n_units, X, Y, Z), a
    per-unit table (dict of lists), a long trajectory table and the :class:`RenderResult`. Stability is
    the mean correlation (inside the mask) between a unit's volumes from different seeds.
    """
    preset = Preset.from_config(preset)
    units = list(units)
    seeds = unit_seeds(seed, task, layer, regularizer, units, n_seeds)
    obj = make_objective(layer, units * n_seeds, objective)
    init_volume = None
    if preset.init == "volume":  # start from the mean training image
        init_volume = np.mean([np.asarray(v, np.float32) for v in real_volumes], axis=0)
    res = render(model, obj, shape, preset, steps=steps, lr=lr, seeds=seeds, device=device, mask=mask,
                 real_volumes=real_volumes, init_volume=init_volume, micro_batch=micro_batch, log=log,
                 record_every=record_every)
    n = len(units)
    imgs = res.images.reshape(n_seeds, n, *shape)
    real = real_activations(model, test_volumes, layer, units, objective, device) if len(test_volumes) else None
    rows = {k: [] for k in ("task", "layer", "unit", "regularizer", "objective", "objective_start", "objective_end",
                            "real_max", "real_mean", "activation_ratio", "stability", "total_variation",
                            "high_freq_fraction", "energy_inside_mask", "std", "max_abs", "seconds",
                            "steps_per_s", "batch")}
    for j, u in enumerate(units):
        st = image_stats(imgs[0, j], mask)
        stab = [correlation(imgs[a, j], imgs[b, j], mask) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
        rmax = float(real[:, j].max()) if real is not None else float("nan")
        row = {"task": task, "layer": layer, "unit": u, "regularizer": regularizer, "objective": objective,
               "objective_start": float(res.objective_start[j]), "objective_end": float(res.objective_end[j]),
               "real_max": rmax, "real_mean": float(real[:, j].mean()) if real is not None else float("nan"),
               "activation_ratio": float(res.objective_end[j] / rmax) if rmax and rmax > 0 else float("nan"),
               "stability": float(np.mean(stab)) if stab else float("nan"), "seconds": res.seconds,
               "steps_per_s": res.steps_per_s, "batch": len(seeds), **st}
        for k in rows:
            rows[k].append(row[k])
    traj = {"unit": [], "step": [], "objective": []}
    for t, step in enumerate(res.trajectory_steps):
        for j, u in enumerate(units):
            traj["unit"].append(u)
            traj["step"].append(int(step))
            traj["objective"].append(float(res.trajectory[t, j]))
    return imgs[0], rows, traj, res


def visualize_job(job):
    """The ``visualize`` / ``visualize_unit`` rule.

    Inputs: ``model`` (a study checkpoint) and the task's dataset files (``participants``, ``volumes``,
    ``mask``, ``reference``). Param ``request``: ``task, layer, regularizer, units, objective, preset, steps,
    lr, n_seeds, n_real, micro_batch, device, seed`` and ``only_unit`` (write that unit alone; the request
    is the layer's, so the volume is the one the layer's job writes). Outputs: ``nifti`` (4D, one volume
    per unit on the dataset grid), ``table`` and, for whole layers, ``trajectory``.
    """
    import pandas as pd

    from ..data.store import Dataset
    from ..models import load_checkpoint
    from ..device import pick_device
    from ..utils import atomic_path

    torch.set_num_threads(job.threads)
    p, log = job.params["request"], job.log
    device = pick_device(p["device"])
    model, _ = load_checkpoint(job.input["model"], map_location=device)
    model.to(device)
    ds = Dataset(job.folder("participants", "volumes", "mask", "reference"))
    grid = ds.grid
    units = list(p["units"])
    log(f"task {p['task']} layer {p['layer']} units {units} regularizer {p['regularizer']} {p['preset']} "
        f"({p['n_seeds']} seeds each, batch {len(units) * p['n_seeds']}, {p['steps']} steps, device {device})")
    imgs, rows, traj, res = visualize_layer(
        model, p["layer"], units, p["preset"], shape=grid.shape, mask=ds.mask,
        real_volumes=split_volumes(ds, "train", p["n_real"]), test_volumes=split_volumes(ds, "test"),
        seed=p["seed"], task=p["task"], regularizer=p["regularizer"], steps=p["steps"], lr=p["lr"],
        n_seeds=p["n_seeds"], objective=p["objective"], device=device, micro_batch=p.get("micro_batch"), log=log)
    if p.get("only_unit") is not None:  # visualize_unit: keep the requested unit only
        j = units.index(p["only_unit"])
        imgs = imgs[j:j + 1]
        rows = {k: v[j:j + 1] for k, v in rows.items()}
    img = grid.to_nifti(np.moveaxis(imgs, 0, -1))
    img.header["descrip"] = f"brainfv {p['task']} {p['layer']} {p['regularizer']}"[:79].encode()
    with atomic_path(job.output["nifti"]) as tmp:
        img.to_filename(tmp)
    with atomic_path(job.output["table"]) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    if "trajectory" in job.output:
        with atomic_path(job.output["trajectory"]) as tmp:
            pd.DataFrame(traj).assign(task=p["task"], layer=p["layer"], regularizer=p["regularizer"]).to_csv(
                tmp, sep="\t", index=False)
    log(f"{len(units)} units in {res.seconds:.1f}s ({res.steps_per_s:.2f} steps/s); objective "
        f"{np.round(res.objective_start[:len(units)], 3).tolist()} -> "
        f"{np.round(res.objective_end[:len(units)], 3).tolist()}")
